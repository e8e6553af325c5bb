"""The Ollama Modelfile: what Ollama runs must match what was judged.

TEMPLATE is read off the training chat template itself; a `PARAMETER stop` is written for every
end token (the end-of-turn marker, eos, the token that opens a turn, and the run's `infer.stop`
strings), and the run's sampling settings follow (`temperature`, `top_p`, `top_k`, `num_predict` =
`infer.max_new_tokens`, `num_ctx`), with Ollama's own repeat penalty and min_p switched off since
transformers applies neither.
"""

from __future__ import annotations

from typing import Any

from llamaduo.config import Config

_U, _A, _S = "LLAMADUOUSERTEXT", "LLAMADUOASSISTANTTEXT", "LLAMADUOSYSTEMTEXT"


def chat_wrappers(tokenizer: Any) -> dict[str, Any]:
    """Text around each role's content and the generation prompt, read off the chat template itself.

    Rendering sentinel messages through the tokenizer's own template makes the Ollama template
    match what the model was trained on, for ChatML and for any template that renders turns
    independently. BOS is left out: llama.cpp/Ollama add it when tokenizing.
    """

    def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    user = [{"role": "user", "content": _U}]
    u = render(user)
    bos = tokenizer.bos_token or ""
    lead = bos if bos and u.startswith(bos) else ""
    u_pre, u_suf = u[len(lead) :].split(_U)
    gen = render(user, gen=True)[len(u) :]
    ua = render(user + [{"role": "assistant", "content": _A}])
    if ua.startswith(u) and _A in ua:
        a_pre, a_suf = ua[len(u) :].split(_A)
    else:
        a_pre, a_suf = gen, tokenizer.eos_token or ""
    system: tuple[str, str] | None = None
    try:
        su = render([{"role": "system", "content": _S}] + user)[len(lead) :]
        tail = u_pre + _U + u_suf
        if su.endswith(tail) and su.count(_S) == 1 and _U not in su.split(_S)[0]:
            s_pre, s_suf = su[: -len(tail)].split(_S)
            system = (s_pre, s_suf)
    except Exception:  # templates that reject a system turn
        system = None
    return {"user": (u_pre, u_suf), "assistant": (a_pre, a_suf), "system": system, "generation": gen}


def stop_tokens(tokenizer: Any, wrappers: dict[str, Any]) -> list[str]:
    """End-of-turn marker, eos, and the special token that opens a turn (ChatML: <|im_end|>, <|im_start|>)."""
    specials = sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", [])} | set(
        getattr(tokenizer, "get_added_vocab", dict)().keys()), key=len, reverse=True)
    out: list[str] = []
    end = wrappers["assistant"][1].strip()
    for cand in (end, tokenizer.eos_token or ""):
        if cand and cand not in out:
            out.append(cand)
    opener = wrappers["user"][0]
    for tok in specials:
        if tok and opener.startswith(tok) and tok not in out:
            out.append(tok)
            break
    return out


def ollama_template(wrappers: dict[str, Any]) -> str:
    """A Go template over .Messages that renders turns exactly like the training template."""
    parts = ["{{ range .Messages }}"]
    branches = []
    if wrappers["system"]:
        branches.append(("system", wrappers["system"]))
    branches += [("user", wrappers["user"]), ("assistant", wrappers["assistant"])]
    for i, (role, (pre, suf)) in enumerate(branches):
        parts.append(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{suf}')
    parts.append("{{ end }}{{ end }}" + wrappers["generation"])
    return "".join(parts)


def _quoted(value: str) -> str:
    """A Modelfile string: plain quotes, or triple quotes around a value with a quote or newline in it."""
    return f'"""{value}"""' if ('"' in value or "\n" in value) else f'"{value}"'


def run_stops(tokenizer: Any, wrappers: dict[str, Any], cfg: Config) -> list[str]:
    """Every end the run's generation stops at: the template's end tokens, then the run's stop strings."""
    out = stop_tokens(tokenizer, wrappers)
    return out + [s for s in cfg.infer.stop if s and s not in out]


def sampling_parameters(cfg: Config, num_ctx: int, top_k: int | None) -> dict[str, float | int]:
    """The run's sampling, as llama.cpp / Ollama parameters (the names both use)."""
    return {
        "temperature": cfg.infer.temperature,
        "top_p": cfg.infer.top_p,
        "top_k": int(top_k or 0),  # transformers samples from the model's top_k; 0 = all
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "num_predict": cfg.infer.max_new_tokens,
        "num_ctx": num_ctx,
    }


def modelfile(source: str, wrappers: dict[str, Any], stops: list[str], cfg: Config, params: dict[str, Any],
              adapter: str | None = None) -> str:
    """`adapter`: a GGUF LoRA Ollama applies over FROM (a quantized base and the round's adapter)."""
    lines = [
        f"# Ollama Modelfile for {cfg.name}: `ollama create {cfg.name} -f Modelfile` in this directory.",
        f"FROM {source}",
        *([f"ADAPTER {adapter}"] if adapter else []),
        f'TEMPLATE """{ollama_template(wrappers)}"""',
    ]
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    lines += [f"PARAMETER {k} {v:g}" if isinstance(v, float) else f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> tuple[str | None, list[str], dict[str, str]]:
    """(FROM, stops, other parameters; ADAPTER among them as "adapter") of a Modelfile as written above."""
    source, stops, params = None, [], {}
    lines = iter(text.splitlines(keepends=True))
    for line in lines:
        if line.startswith("FROM "):
            source = line[5:].strip()
        elif line.startswith("ADAPTER "):
            params["adapter"] = line[8:].strip()
        elif line.startswith("PARAMETER "):
            key, _, value = line[10:].partition(" ")
            if value.startswith('"""'):
                value = value[3:]
                while '"""' not in value:
                    value += next(lines)
                value = value[: value.index('"""')]
            else:
                value = value.strip()
                value = value[1:-1] if value.startswith('"') and value.endswith('"') else value
            if key == "stop":
                stops.append(value)
            else:
                params[key] = value
    return source, stops, params
