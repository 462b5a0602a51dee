// Streams a chat answer and asks the router, over native gRPC through Envoy (TLS, HTTP/2).
//   node dist/example.js [--target localhost:5001] [--ca ../../.state/tls/edge.crt] [--api-key KEY]
import { readFileSync } from "node:fs";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ChatService } from "./gen/capibara/gateway/v1/gateway_pb.js";
import { RouterService } from "./gen/capibara/router/v1/router_pb.js";

function option(name: string, fallback: string): string {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 && process.argv[at + 1] ? process.argv[at + 1] : fallback;
}

const target = option("target", "localhost:5001");
const ca = readFileSync(option("ca", "../../.state/tls/edge.crt"));
const apiKey = option("api-key", process.env.CAPIBARA_API_KEY ?? "");

const transport = createGrpcTransport({
  baseUrl: `https://${target}`,
  nodeOptions: { ca },
  interceptors: apiKey
    ? [(next) => async (request) => { request.header.set("authorization", `Bearer ${apiKey}`); return next(request); }]
    : [],
});

const router = createClient(RouterService, transport);
const decision = await router.route({ query: "escribe una función en Python que ordene una lista" });
console.log(`route: ${decision.routeName} -> ${decision.modelId} (confidence ${decision.confidence.toFixed(2)})`);

const chat = createClient(ChatService, transport);
let tokens = 0;
let done = false;
for await (const response of chat.chat({ message: "Say hello in Spanish.", maxTokens: 16, temperature: 0 },
                                       { timeoutMs: 60_000 })) {
  switch (response.event.case) {
    case "routing":
      console.log(`answering: ${response.event.value.modelId} (${response.event.value.reasoning})`);
      break;
    case "reasoning":
      // A reasoning model's thinking, apart from the answer: to stderr, so stdout stays the answer.
      process.stderr.write(response.event.value.text);
      break;
    case "token":
      tokens += 1;
      process.stdout.write(response.event.value.text);
      break;
    case "done":
      done = true;
      console.log(`\ndone: ${response.event.value.usage?.completionTokens} tokens in ${response.event.value.latencyMs.toFixed(0)} ms`);
      break;
    case "error":
      throw new Error(`stream error ${response.event.value.code}: ${response.event.value.message}`);
  }
}
if (tokens === 0 || !done) {
  throw new Error(`the stream ended without tokens or done (tokens=${tokens}, done=${done})`);
}
