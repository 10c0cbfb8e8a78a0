// The Node SDKs against a Signalbox base URL (argv[2], ending in /v1) with key argv[3]: the openai package's
// client.responses (whole and streamed) and the Vercel AI SDK's default OpenAI model (the Responses API):
// generateText with a tool in a loop, streamText, generateObject. Prints one JSON object of what each got.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, apiKey] = process.argv.slice(2);
const out = {};

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });
const whole = await client.responses.create({ model: "mock-chat", input: "hello from node" });
out.responses = { status: whole.status, text: whole.output_text, outputTokens: whole.usage.output_tokens };
const events = await client.responses.create({ model: "mock-chat", input: "hello from node", stream: true });
const kinds = [];
let streamed = "";
for await (const event of events) {
  kinds.push(event.type);
  if (event.type === "response.output_text.delta") streamed += event.delta;
}
out.responsesStream = { first: kinds[0], last: kinds.at(-1), deltas: kinds.filter((k) => k.endsWith(".delta")).length, text: streamed };

const provider = createOpenAI({ baseURL, apiKey });
const model = provider("mock-chat"); // the AI SDK's default OpenAI model speaks the Responses API
const calls = [];
const looped = await generateText({
  model,
  prompt: "what is the weather in Lisbon?",
  tools: {
    get_weather: tool({
      description: "the weather in a city",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => {
        calls.push(city);
        return `sunny in ${city}`;
      },
    }),
  },
  stopWhen: stepCountIs(5),
  maxRetries: 0,
});
out.toolLoop = { calls: calls.length, steps: looped.steps.length, finish: looped.finishReason, text: looped.text };

const stream = streamText({ model, prompt: "stream to me", maxRetries: 0 });
let text = "";
for await (const piece of stream.textStream) text += piece;
out.streamText = { text, finish: await stream.finishReason };

const shape = z.object({
  city: z.string(),
  days: z.array(z.object({ day: z.string(), celsius: z.number().int().min(-40).max(50) })).min(2),
  unit: z.enum(["c", "f"]),
});
const object = await generateObject({ model, schema: shape, prompt: "a forecast for Lisbon", maxRetries: 0 });
out.generateObject = { object: object.object, valid: shape.safeParse(object.object).success };

console.log(JSON.stringify(out));
