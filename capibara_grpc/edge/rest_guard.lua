-- REST guard for the edge (envoy_config.py prepends the ALLOWED_FIELDS table).
-- Rejects REST bodies that carry fields the API does not have: the transcoder would drop them
-- silently, and a misspelt "max_token" would then quietly be ignored. The reply is a local one,
-- so local_reply_config turns it into the same JSON error body as every other 400.

local function top_level_keys(text)
  local keys = {}
  local i, n, depth = 1, #text, 0
  local object_at_top, expect_key = false, false
  while i <= n do
    local c = text:sub(i, i)
    if c == '"' then
      local j = i + 1
      while j <= n do
        local d = text:sub(j, j)
        if d == "\\" then
          j = j + 2
        elseif d == '"' then
          break
        else
          j = j + 1
        end
      end
      if depth == 1 and object_at_top and expect_key then
        keys[#keys + 1] = text:sub(i + 1, j - 1)
        expect_key = false
      end
      i = j + 1
    else
      if c == "{" or c == "[" then
        depth = depth + 1
        if depth == 1 then
          object_at_top = (c == "{")
          expect_key = object_at_top
        end
      elseif c == "}" or c == "]" then
        depth = depth - 1
      elseif c == "," and depth == 1 then
        expect_key = true
      end
      i = i + 1
    end
  end
  return keys
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if headers:get(":method") ~= "POST" then
    return
  end
  local content_type = headers:get("content-type") or ""
  if content_type:find("application/grpc", 1, true) then
    return
  end
  local path = (headers:get(":path") or ""):gsub("%?.*$", "")
  local allowed = ALLOWED_FIELDS[path]
  if allowed == nil then
    return
  end
  local body = handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  for _, key in ipairs(top_level_keys(body:getBytes(0, body:length()))) do
    if not allowed.fields[key] then
      local shown = key:gsub("[^%w_%-%.]", "?"):sub(1, 64)
      handle:respond(
        { [":status"] = "400", ["content-type"] = "text/plain" },
        "unknown field '" .. shown .. "' (accepted: " .. allowed.listing .. ")"
      )
      return
    end
  end
end
