-- Guard for the edge (envoy_config.py prepends ALLOWED_FIELDS, API_KEYS_FILE and OPEN_PATHS).
-- With API keys configured, rejects calls without a valid key (401; UNAUTHENTICATED for gRPC).
-- Rejects REST bodies that are not JSON (naming line and column) or that carry fields the API
-- does not have: the transcoder would drop those silently, and a misspelt "max_token" would then
-- quietly be ignored. The reply is a local one, so local_reply_config turns it into the same JSON
-- error body as every other 400.

-- A small JSON checker: Envoy's transcoder would also reject malformed JSON, but its message
-- marks a byte offset, while someone fixing a pasted document needs the line and column.
-- It returns the top-level object's keys, or nil and an error naming where the body breaks.
local function json_top_level_keys(text)
  local pos, keys = 1, {}
  local fail

  local function where(at)
    local line, column_start = 1, 1
    for newline in text:sub(1, at - 1):gmatch("()\n") do
      line, column_start = line + 1, newline + 1
    end
    return "line " .. line .. ", column " .. (at - column_start + 1)
  end

  local function error_at(at, what)
    fail = "invalid JSON at " .. where(at) .. ": " .. what
    error(fail, 0)
  end

  local function skip_space()
    pos = text:find("[^ \t\r\n]", pos) or (#text + 1)
  end

  local function read_string()
    local i = pos + 1
    while true do
      local stop = text:find('[\"\\%c]', i)
      if stop == nil then
        error_at(pos, "string is not closed")
      end
      local c = text:sub(stop, stop)
      if c == '"' then
        local value = text:sub(pos + 1, stop - 1)
        pos = stop + 1
        return value
      elseif c == "\\" then
        i = stop + 2
      else
        error_at(stop, "control character (a raw line break?) inside a string")
      end
    end
  end

  local read_value

  local function read_container(close, on_item)
    pos = pos + 1
    skip_space()
    if text:sub(pos, pos) == close then
      pos = pos + 1
      return
    end
    while true do
      on_item()
      skip_space()
      local c = text:sub(pos, pos)
      if c == close then
        pos = pos + 1
        return
      elseif c ~= "," then
        error_at(pos, "expected ',' or '" .. close .. "'")
      end
      pos = pos + 1
      skip_space()
    end
  end

  read_value = function(depth)
    skip_space()
    local c = text:sub(pos, pos)
    if c == "{" then
      read_container("}", function()
        if text:sub(pos, pos) ~= '"' then
          error_at(pos, "expected a field name in double quotes")
        end
        local key = read_string()
        if depth == 0 then
          keys[#keys + 1] = key
        end
        skip_space()
        if text:sub(pos, pos) ~= ":" then
          error_at(pos, "expected ':' after a field name")
        end
        pos = pos + 1
        read_value(depth + 1)
      end)
    elseif c == "[" then
      read_container("]", function() read_value(depth + 1) end)
    elseif c == '"' then
      read_string()
    else
      local token = text:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
        or text:match("^true", pos) or text:match("^false", pos) or text:match("^null", pos)
      if token == nil then
        if c == "" then
          error_at(pos, "the body ends too early")
        elseif c == "'" then
          error_at(pos, "single quote: JSON strings and field names take double quotes")
        end
        error_at(pos, "unexpected '" .. c .. "'")
      end
      pos = pos + #token
    end
  end

  local ok = pcall(function()
    read_value(0)
    skip_space()
    if pos <= #text then
      error_at(pos, "unexpected text after the end of the JSON value")
    end
  end)
  if not ok then
    return nil, fail or "invalid JSON"
  end
  return keys
end

local function reject(handle, message)
  handle:respond({ [":status"] = "400", ["content-type"] = "text/plain" }, message)
end

-- API keys: one per line in API_KEYS_FILE ('#' starts a comment) and comma-separated in
-- $CAPIBARA_API_KEYS, read once when the filter loads (the mesh checked their format at startup).
-- `name: key` gives a key a name; API_KEYS maps each key to its id, that name or the key's short
-- id (key_id.lua), which is all the services and Envoy's rate limits ever see of it.
API_KEYS = {}
-- Set on every call with a valid key, for the gateway's usage counters and the per-key rate
-- limits; a client's own copy is always dropped, so nobody can spend another key's quota.
KEY_ID_HEADER = "x-capibara-key-id"
-- Marks a call whose request the mesh validated already (capibara_grpc/tracing.py): never a client's.
VALIDATED_HEADER = "x-capibara-validated"
local function add_key(text)
  local entry = (text:gsub("#.*$", "")):match("^%s*(.-)%s*$")
  local name, key = entry:match("^([^:]*):(.*)$")
  name, key = (name or ""):match("^%s*(.-)%s*$"), (key or entry):match("^%s*(.-)%s*$")
  if key ~= "" then
    API_KEYS[key] = name ~= "" and name or key_short_id(key)
  end
end
if API_KEYS_FILE ~= "" then
  local file = io.open(API_KEYS_FILE, "r")
  if file then
    for line in file:lines() do
      add_key(line)
    end
    file:close()
  end
end
for key in (os.getenv("CAPIBARA_API_KEYS") or ""):gmatch("[^,]+") do
  add_key(key)
end

local function presented_key(headers)
  local key = headers:get("x-api-key")
  if key == nil then
    local authorization = headers:get("authorization")
    key = authorization and authorization:match("^[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
  end
  return key
end

-- The OpenAI-compatible API (/v1/...) answers errors in OpenAI's shape:
-- {"error": {"message", "type", "param", "code"}}, whoever produced them (this guard, the
-- transcoder from a gRPC status, Envoy's own replies). The gateway names the offending field by
-- starting its message with "param <name>: ".
OPENAI_PREFIX = "/v1/"
OPENAI_ERRORS = {
  [400] = { "invalid_request_error", "invalid_request" },
  [401] = { "authentication_error", "invalid_api_key" },
  [403] = { "permission_error", "permission_denied" },
  [404] = { "invalid_request_error", "model_not_found" },
  [413] = { "invalid_request_error", "request_too_large" },
  [429] = { "rate_limit_error", "rate_limit_exceeded" },
  [501] = { "invalid_request_error", "unsupported" },
  [503] = { "server_error", "service_unavailable" },
  [504] = { "server_error", "timeout" },
}

local function json_string(text)
  local escaped = text:gsub('[%c"\\]', function(c)
    if c == '"' then
      return '\\"'
    elseif c == "\\" then
      return "\\\\"
    elseif c == "\n" then
      return "\\n"
    end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

-- `message` is raw text (escaped here), or already a JSON string literal when `literal` is true.
function openai_error(status, message, literal)
  local kind = OPENAI_ERRORS[status] or { status >= 500 and "server_error" or "invalid_request_error", "error" }
  local param = "null"
  local inner = literal and message:sub(2, -2) or message
  local name, rest = inner:match("^param ([%w_%.%[%]]+): (.*)$")
  if name then
    param = json_string(name)
    message = literal and ('"' .. rest .. '"') or rest
  end
  local text = literal and message or json_string(message)
  return '{"error":{"message":' .. text .. ',"type":"' .. kind[1] .. '","param":' .. param
    .. ',"code":"' .. kind[2] .. '"}}'
end

-- The JSON string literal (quotes included, escapes kept) of a top-level "name": "..." in `text`.
function json_string_field(text, name)
  local start = select(2, text:find('"' .. name .. '"%s*:%s*"'))
  if start == nil then
    return nil
  end
  local i = start + 1
  while true do
    local stop = text:find('["\\]', i)
    if stop == nil then
      return nil
    elseif text:sub(stop, stop) == '"' then
      return text:sub(start, stop)
    end
    i = stop + 2
  end
end

local function is_openai(path)
  return path:sub(1, #OPENAI_PREFIX) == OPENAI_PREFIX
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if is_openai(headers:get(":path") or "") then
    -- envoy_on_response rewrites its errors, this guard's own 401 included.
    handle:streamInfo():dynamicMetadata():set("capibara", "openai", "1")
  end
  headers:remove(KEY_ID_HEADER)
  headers:remove(VALIDATED_HEADER)
  if next(API_KEYS) ~= nil and headers:get(":method") ~= "OPTIONS" then
    local bare_path = (headers:get(":path") or ""):gsub("%?.*$", "")
    local key = presented_key(headers)
    if not OPEN_PATHS[bare_path] and (key == nil or not API_KEYS[key]) then
      handle:respond(
        { [":status"] = "401", ["content-type"] = "text/plain", ["www-authenticate"] = 'Bearer realm="capibara"' },
        key == nil and "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
          or "invalid API key"
      )
      return
    end
    if key ~= nil and API_KEYS[key] then
      headers:add(KEY_ID_HEADER, API_KEYS[key])
    end
  end
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
  local keys, problem = json_top_level_keys(body:getBytes(0, body:length()))
  if keys == nil then
    reject(handle, problem)
    return
  end
  for _, key in ipairs(keys) do
    if not allowed.fields[key] then
      local shown = key:gsub("[^%w_%-%.]", "?"):sub(1, 64)
      reject(handle, "unknown field '" .. shown .. "' (accepted: " .. allowed.listing .. ")")
      return
    end
  end
end

-- Errors on /v1/... leave in OpenAI's shape. The transcoder (from a gRPC status) and Envoy's local
-- replies write {"code": <grpc code>, "message": "...", "details": []}; that becomes
-- {"error": {...}} with the same HTTP status. Successful answers (streams too) are not touched.
function envoy_on_response(handle)
  local metadata = handle:streamInfo():dynamicMetadata():get("capibara")
  if metadata == nil or metadata["openai"] ~= "1" then
    return
  end
  local status = tonumber(handle:headers():get(":status") or "200")
  if status < 400 then
    return
  end
  local body = handle:body()
  local text = body and body:getBytes(0, body:length()) or ""
  if text:sub(1, 9) == '{"error":' then
    return
  end
  local literal = json_string_field(text, "message")
  local message = literal or json_string(text ~= "" and text or ("HTTP " .. status))
  local rewritten = openai_error(status, message, true)
  body:setBytes(rewritten)
  handle:headers():replace("content-type", "application/json")
  handle:headers():replace("content-length", tostring(#rewritten))
end
