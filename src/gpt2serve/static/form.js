// The request form: one field per field of the server's request model (GET /info `request.fields`,
// a JSON schema with defaults and descriptions), the ones the chosen mode does not read disabled,
// and server errors shown next to the field they name.

// Where the fields go and what they are called on the page; a field missing here still appears, last.
const ORDER = ["mode", "num_return_sequences", "max_new_tokens", "temperature", "top_k", "top_p",
  "num_beams", "seed", "no_repeat_ngram_size", "repetition_penalty", "stop", "max_length"];
const LABELS = { num_return_sequences: "sequences", max_new_tokens: "max new tokens",
  no_repeat_ngram_size: "no-repeat n-gram", repetition_penalty: "repetition penalty", max_length: "max length",
  top_k: "top k", top_p: "top p", num_beams: "beams" };
const SKIP = new Set(["input", "stream"]);

/** The kind of a JSON-schema property: "integer", "number", "string" (null branches ignored). */
function kindOf(prop) {
  const types = prop.type ? [prop.type] : (prop.anyOf || []).map((p) => p.type);
  return ["integer", "number", "string"].find((t) => types.includes(t)) || "string";
}

export class RequestForm {
  /** `root` receives the fields; `request` is GET /info's `request` object. */
  constructor(root, request, onChange) {
    this.request = request;
    this.props = request.fields;
    this.inputs = new Map([["input", document.getElementById("f-input")]]);
    const names = Object.keys(this.props).filter((n) => !SKIP.has(n));
    names.sort((a, b) => rank(a) - rank(b));
    const modeFields = new Set(Object.values(request.modes).flat());
    this.modeDependent = modeFields;
    for (const name of names) root.append(this.field(name));
    this.inputs.get("mode").addEventListener("change", () => this.applyMode());
    for (const input of this.inputs.values()) input.addEventListener("input", onChange);
    this.applyMode();
  }

  field(name) {
    const prop = this.props[name];
    const wrap = document.createElement("div");
    wrap.className = "field";
    wrap.dataset.field = name;
    const label = document.createElement("label");
    label.htmlFor = `f-${name}`;
    label.textContent = LABELS[name] || name.replaceAll("_", " ");
    const code = document.createElement("code");
    code.textContent = name;
    label.append(code);
    const input = name === "mode" ? this.modeSelect(prop) : this.textInput(name, prop);
    input.id = `f-${name}`;
    input.dataset.field = name;
    input.title = prop.description || name;
    const error = document.createElement("p");
    error.className = "field-error";
    error.id = `err-${name}`;
    error.setAttribute("role", "alert");
    input.setAttribute("aria-describedby", error.id);
    wrap.append(label, input, error);
    this.inputs.set(name, input);
    return wrap;
  }

  modeSelect(prop) {
    const select = document.createElement("select");
    for (const mode of Object.keys(this.request.modes)) select.append(new Option(mode, mode));
    select.value = prop.default ?? this.request.default_mode;
    return select;
  }

  textInput(name, prop) {
    const input = document.createElement("input");
    const kind = kindOf(prop);
    input.type = "text"; // not type=number: the server, not the browser, judges a value
    input.inputMode = kind === "integer" ? "numeric" : kind === "number" ? "decimal" : "text";
    input.autocomplete = "off";
    input.spellcheck = false;
    if (prop.default !== null && prop.default !== undefined) input.value = String(prop.default);
    else input.placeholder = name === "seed" ? "not seeded" : "not set";
    return input;
  }

  applyMode() {
    const reads = new Set(this.request.modes[this.inputs.get("mode").value] || []);
    for (const name of this.modeDependent) {
      const input = this.inputs.get(name);
      if (!input) continue;
      input.disabled = !reads.has(name);
      input.closest(".field").classList.toggle("off", input.disabled);
    }
  }

  /** The request to send: the prompt, and each enabled field whose value differs from its default.
   *  A value that does not parse is sent as typed, so the server names what is wrong with it. */
  body() {
    const body = { input: this.inputs.get("input").value };
    for (const [name, input] of this.inputs) {
      if (name === "input" || input.disabled) continue;
      const text = input.value.trim();
      if (text === "") continue;
      const value = parse(text, kindOf(this.props[name]));
      if (value !== this.props[name].default) body[name] = value;
    }
    return body;
  }

  /** `body` with every default filled in. */
  effective(body) {
    const all = {};
    for (const [name, prop] of Object.entries(this.props)) all[name] = prop.default ?? null;
    return { ...all, ...body };
  }

  clearErrors() {
    for (const el of document.querySelectorAll(".field-error")) el.textContent = "";
    for (const input of this.inputs.values()) input.removeAttribute("aria-invalid");
  }

  /** Show the envelope's message next to the field its `param` names (else under the buttons). */
  showError(error) {
    const name = String(error.param || "").split(".")[0];
    const input = this.inputs.get(name);
    const target = (input && document.getElementById(`err-${name}`)) || document.getElementById("err-general");
    target.textContent = error.message || "the server refused the request";
    if (input) {
      input.setAttribute("aria-invalid", "true");
      if (!target.closest(".field")?.classList.contains("off")) input.focus({ preventScroll: false });
    }
  }
}

function rank(name) {
  const i = ORDER.indexOf(name);
  return i < 0 ? ORDER.length : i;
}

function parse(text, kind) {
  if (kind === "integer" && /^[+-]?\d+$/.test(text)) return Number(text);
  if (kind === "number" && /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(text)) return Number(text);
  return text;
}
