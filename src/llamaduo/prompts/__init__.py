"""The judge and synthesis prompt templates: load (packaged or user override) and render.

A template defines `{% block system %}` and `{% block user %}`; each becomes one chat
message. A template without blocks renders to a single user message. Data placed in the
prompt goes through the `fenced` filter, which defuses text that would close or open one of
the tagged blocks (so a candidate answer cannot end its own block and speak to the judge).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from llamaduo.errors import UserError

_TAG = re.compile(r"<(/?\s*(?:instruction|reference|candidate|example_instruction|example_response)\s*)>", re.I)


def fenced(text: Any) -> str:
    """Data text with block tags defused: `</candidate>` becomes `&lt;/candidate&gt;`."""
    return _TAG.sub(r"&lt;\1&gt;", "" if text is None else str(text))


@dataclass(frozen=True)
class Template:
    text: str
    source: str  # the packaged name or the override path, for messages

    @property
    def hash(self) -> str:
        """Short hash of the template text (recorded in the lineage of what it produced)."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @cached_property
    def compiled(self) -> jinja2.Template:
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
        env.filters["fenced"] = fenced
        try:
            return env.from_string(self.text)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{self.source}:{e.lineno}: template syntax error: {e.message}") from None

    def render(self, **ctx: Any) -> list[dict[str, str]]:
        """Chat messages: one per block (system, user), or one user message without blocks."""
        tmpl = self.compiled
        try:
            if "system" in tmpl.blocks or "user" in tmpl.blocks:
                context = tmpl.new_context(ctx)
                out = []
                for role in ("system", "user"):
                    if role in tmpl.blocks:
                        content = "".join(tmpl.blocks[role](context)).strip()
                        if content:
                            out.append({"role": role, "content": content})
                return out
            return [{"role": "user", "content": tmpl.render(**ctx).strip()}]
        except jinja2.UndefinedError as e:
            raise UserError(f"{self.source}: {e.message} (available: {', '.join(sorted(ctx))})") from None


def load(name: str, override: Path | None = None, field: str = "template") -> Template:
    """The packaged template `name` (e.g. "judge.jinja"), or the user's file when given."""
    if override is not None:
        path = Path(override)
        try:
            return Template(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError:
            raise UserError(f"{field}: {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{field}: {path}: cannot read: {e}") from None
    return Template(resources.files("llamaduo").joinpath("prompts").joinpath(name).read_text(encoding="utf-8"), name)
