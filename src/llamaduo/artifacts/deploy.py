"""What deploy wrote (each GGUF, or why it failed) and how each export scored (`accept --runtime`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llamaduo.artifacts.run import _Artifact


# ------------------------------------------------------------------------ deploy
class GGUFFile(_Artifact):
    """One GGUF deploy was asked for: written (with what its metadata holds) or failed, with why."""

    kind: str  # f16 / bf16 / f32 from the converter, or a quantization (q8_0, q4_k_m, ...)
    status: Literal["ok", "failed"]
    file: str | None = None  # name under deploy/
    adapter: str | None = None  # a GGUF LoRA under deploy/ the runtime applies over `file` (base + adapter)
    note: str | None = None  # how it was made, where that is not the usual way
    error: str | None = None  # one line: what failed, from the converter's or quantizer's own message
    size_bytes: int | None = None  # with its adapter
    chat_template: bool | None = None  # tokenizer.chat_template is in its metadata
    seconds: float | None = None


class DeployManifest(_Artifact):
    """deploy/manifest.json: the round exported and each requested artifact, ok or failed."""

    round: int
    at: str
    formats: list[str]
    merged: str | None = None  # dir name under deploy/
    modelfile: str | None = None
    modelfile_from: str | None = None  # what its FROM names
    shipped: str | None = None  # the GGUF kind the Modelfile points at and the gate judges
    converter: str | None = None  # where llama.cpp's converter came from (llama-cpp-python version or a dir)
    gguf: list[GGUFFile] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)  # "gguf:q4_k_m: <why>" for every requested format that failed
    warnings: list[str] = Field(default_factory=list)  # e.g. why another GGUF ships than the default

    def file(self, kind: str) -> GGUFFile | None:
        return next((g for g in self.gguf if g.kind == kind), None)


class ParityRow(_Artifact):
    """One artifact judged and timed through the runtime that serves it (`accept --runtime`)."""

    artifact: str  # "merged" (HF dir via llamaduo serve), a GGUF kind, or "endpoint"
    runtime: str  # "llamaduo serve", "llama.cpp", or the endpoint's URL
    value: float | None = None  # the pass statistic of its judged answers
    ci: tuple[float, float] | None = None
    difference: float | None = None  # value − best round's, paired over the test prompts
    difference_ci: tuple[float, float] | None = None
    identical: float | None = None  # share of greedy answers equal to the reference answers
    identical_to: str | None = None  # what they were compared with
    tokens_per_s: float | None = None  # greedy decode, one client
    peak_rss_mb: float | None = None  # the server process's high-water mark
    prompts: int = 0
    rejected: bool | None = None  # the gate: drop beyond max_drop with the whole CI
    error: str | None = None  # why it could not be measured


class Parity(_Artifact):
    """deploy/parity.json: per artifact, the judged score and the gate's verdict on the shipped one."""

    round: int
    metric: str
    statistic: str
    round_value: float | None = None
    max_drop: float
    shipped: str | None = None
    shipped_rejected: bool | None = None
    passes_instead: list[str] = Field(default_factory=list)
    rows: list[ParityRow] = Field(default_factory=list)

    def row(self, artifact: str) -> ParityRow | None:
        return next((r for r in self.rows if r.artifact == artifact), None)
