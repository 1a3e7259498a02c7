// Server-sent events read from a fetch() body (EventSource cannot POST).
//
// The server (gpt2serve.api.streaming) sends, per event, an optional `event: NAME` line and one
// `data: JSON` line, then a blank line: unnamed events carry {index, text, finish_reason}, `done` carries
// {outputs, usage}, `error` carries the error envelope {error: {message, type, param, code}}.
// This reader follows the SSE rules (CRLF or LF, several data lines joined by "\n", comments skipped).

/** Yields {event, data} for each event in `body` (a ReadableStream of bytes); data is parsed JSON. */
export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = blockEnd(buffer)) !== null) {
        const event = parseBlock(buffer.slice(0, end.start));
        buffer = buffer.slice(end.stop);
        if (event) yield event;
      }
    }
    const last = parseBlock(buffer);
    if (last) yield last;
  } finally {
    reader.releaseLock();
  }
}

function blockEnd(text) {
  const match = /\r?\n\r?\n|\r\r/.exec(text);
  return match ? { start: match.index, stop: match.index + match[0].length } : null;
}

function parseBlock(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  const raw = data.join("\n");
  return { event, data: raw === "[DONE]" ? null : JSON.parse(raw) };
}
