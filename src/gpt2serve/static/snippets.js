// "Copy as": the playground's request as curl, boto3, the OpenAI client and `gpt2serve invoke`.
//
// `body` is the request the page sends (fields left at their defaults are omitted), without "stream";
// `effective` is the same with every default filled in (from GET /info); `withKey` adds the API key
// as $GPT2SERVE_API_KEY (the key itself is never written out).

const KEY_ENV = "GPT2SERVE_API_KEY";

export function snippet(kind, { body, effective, origin, withKey }) {
  const make = { curl, boto3, openai, invoke }[kind];
  return make(body, effective, origin, withKey);
}

function shellQuote(text) {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", `'"'"'`)}'`;
}

function py(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value); // numbers, and strings: a JSON string is a valid Python literal
}

function curl(body, effective, origin, withKey) {
  const auth = withKey ? ` \\\n     -H "Authorization: Bearer $${KEY_ENV}"` : "";
  const data = JSON.stringify({ ...body, stream: true });
  return `curl -N ${origin}/invocations -H 'Content-Type: application/json'${auth} \\\n` +
    `     -d ${shellQuote(data)}\n` +
    "# server-sent events: one per piece of text, then `event: done` with the whole answer";
}

function boto3(body, effective, origin, withKey) {
  const note = withKey ? "\n# a server with API keys takes boto3's SigV4 signature from the key pairs it knows" : "";
  return `import json\nimport boto3\n${note}
runtime = boto3.client("sagemaker-runtime", endpoint_url=${py(origin)}, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
resp = runtime.invoke_endpoint(EndpointName="gpt-2", ContentType="application/json",
                               Body=json.dumps(${py(body)}))
print(json.loads(resp["Body"].read()))`.replace("\n\n\n", "\n\n");
}

// The seed request's mode in OpenAI's terms: temperature 0 is greedy; top_k is gpt2serve's extension.
function openaiSampling(e) {
  switch (e.mode) {
    case "greedy": return { args: { temperature: 0 }, extra: {} };
    case "sample": return { args: { temperature: e.temperature, top_p: e.top_p }, extra: { top_k: e.top_k } };
    case "sample-top-k": return { args: { temperature: 1, top_p: 1 }, extra: { top_k: e.top_k } };
    case "sample-top-p": return { args: { temperature: 1, top_p: e.top_p }, extra: { top_k: 50 } };
    default: return null;
  }
}

function openai(body, e, origin, withKey) {
  const sampling = openaiSampling(e);
  if (!sampling) {
    return `# The OpenAI completions API has no ${e.mode} search: call POST /invocations ` +
      "(curl, boto3 or gpt2serve invoke) for this mode.";
  }
  const args = { prompt: e.input, n: e.num_return_sequences, ...sampling.args };
  const notes = [];
  if (e.max_new_tokens != null) args.max_tokens = e.max_new_tokens;
  else notes.push(`# max_tokens counts generated tokens; this request's max_length (${e.max_length ?? 100}) counts the prompt too`);
  if (e.seed != null && e.seed !== -1 && e.mode !== "greedy") args.seed = e.seed;
  if (e.stop != null && e.stop !== "") args.stop = e.stop;
  if (e.repetition_penalty !== 1) notes.push("# repetition_penalty has no OpenAI equivalent: left out");
  if (e.no_repeat_ngram_size != null) notes.push("# no_repeat_ngram_size has no OpenAI equivalent: left out");
  const key = withKey ? `os.environ[${py(KEY_ENV)}]` : '"unused"';
  const lines = Object.entries(args).map(([k, v]) => `    ${k}=${py(v)},`);
  if (Object.keys(sampling.extra).length) lines.push(`    extra_body=${py(sampling.extra)},`);
  return [withKey ? "import os\n" : "", "from openai import OpenAI\n", ...notes.map((n) => n + "\n"),
    `client = OpenAI(base_url=${py(origin + "/v1")}, api_key=${key})\n`,
    `stream = client.completions.create(\n    model="gpt2",\n${lines.join("\n")}\n    stream=True,\n)\n`,
    `texts = [""] * ${args.n}\n`,
    "for chunk in stream:  # pieces of each choice's text as they come\n",
    "    for choice in chunk.choices:\n        texts[choice.index] += choice.text\n",
    "print(texts)"].join("");
}

function invoke(body, effective, origin, withKey) {
  const flags = Object.entries(body).filter(([name]) => name !== "input")
    .map(([name, value]) => `--${name.replaceAll("_", "-")} ${shellQuote(String(value))}`);
  const key = withKey ? `# with the API key in $${KEY_ENV}\n` : "";
  return `${key}gpt2serve invoke ${shellQuote(body.input)} --url ${origin} --stream` +
    (flags.length ? " \\\n    " + flags.join(" ") : "");
}
