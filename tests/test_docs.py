"""The docs hold: every relative link in README.md, docs/ and benchmarks/README.md points at a file that exists
(and at a heading that exists, when it names one), and every ``fedge ...`` command they name exists in
``fedge.cli.build_parser()``, subcommands and ``--flags`` alike.

No network, no model, no torch: the checks read markdown and walk argparse. The checks are functions of a text and
its path, so the tests at the end feed them a broken copy and assert they report it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, every markdown file under docs/, and benchmarks/README.md (those that exist)."""
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md")), root / "benchmarks" / "README.md"]
    return [f for f in files if f.is_file()]


# ---------------------------------------------------------------------------------------------------- markdown

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)")
# an inline code span: a run of n backticks, then anything up to the next run of exactly n (not across a blank line)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text] (one level of nested brackets), or ![alt]
    r"\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?"  # (target: balanced parentheses allowed)
    r"(?:\s+[\"'][^\"']*[\"'])?\s*\)"  # an optional "title"
)
_LINK_DEF = re.compile(r"^[ ]{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+[\"'(].*)?$", re.MULTILINE)
_HEADING = re.compile(r"^[ ]{0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def split_fences(text: str) -> tuple[str, list[tuple[int, str, list[str]]]]:
    """(the text with every fenced block's lines blanked, keeping line numbers; the fenced blocks as
    (first content line number, info string, lines))."""
    prose, blocks = [], []
    fence = None  # (char, length) of the open fence
    for number, line in enumerate(text.split("\n"), start=1):
        m = _FENCE.match(line)
        if fence is None:
            if m and not (m.group(1)[0] == "`" and "`" in line[m.end(1) :]):
                fence = (m.group(1)[0], len(m.group(1)))
                blocks.append((number + 1, m.group(2).lower(), []))
                prose.append("")
            else:
                prose.append(line)
            continue
        if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1] and not line[m.end() :].strip():
            fence = None
        else:
            blocks[-1][2].append(line)
        prose.append("")
    return "\n".join(prose), blocks


def mask_code_spans(prose: str) -> str:
    """``prose`` with every inline code span's characters turned to spaces (newlines kept): links are looked for
    outside code only, at the same offsets."""
    return _CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _name(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and reference definition outside code."""
    prose = mask_code_spans(split_fences(text)[0])
    found = [(m.start(), m.group(1)) for m in (*_LINK.finditer(prose), *_LINK_DEF.finditer(prose))]
    return [(_line(prose, offset), target) for offset, target in sorted(found)]


def _local(target: str) -> bool:
    return bool(target) and not target.startswith("#") and not _SCHEME.match(target) and not target.startswith("//")


def _resolve(target: str, md_path: Path, root: Path) -> Path:
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    return (root / path.lstrip("/")) if path.startswith("/") else (md_path.parent / path)


def link_problems(text: str, md_path: Path, root: Path = ROOT) -> list[str]:
    """One message per relative link whose file or directory does not exist (anchors stripped; web, mailto and
    same-page ``#anchor`` links skipped), naming the markdown file, the line and the target."""
    problems = []
    for line, target in links(text):
        if _local(target) and not _resolve(target, md_path, root).exists():
            problems.append(f"{_name(md_path, root)}:{line}: broken link {target!r}")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links reduced to their text, then lower case, punctuation dropped
    (letters, digits, spaces, hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a markdown file offers: its headings' slugs (repeats numbered -1, -2, ... as GitHub does) and
    explicit ``<a id=...>`` / ``<a name=...>``."""
    prose = split_fences(text)[0]
    seen: dict[str, int] = {}
    found = set()
    for line in prose.split("\n"):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(a.lower() for a in _HTML_ANCHOR.findall(prose))
    return found


def anchor_problems(text: str, md_path: Path, root: Path = ROOT) -> list[str]:
    """One message per ``#anchor`` (same page, or on a linked markdown file that exists) that is no heading there."""
    problems, cache = [], {}
    for line, target in links(text):
        if "#" not in target or _SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, anchor = target.split("#", 1)
        dest = md_path if not path_part else _resolve(path_part, md_path, root)
        if dest.suffix.lower() != ".md" or not dest.is_file():
            continue  # a missing file is link_problems' to report
        if dest not in cache:
            cache[dest] = anchors(text if dest == md_path else dest.read_text(encoding="utf-8"))
        if unquote(anchor).lower() not in cache[dest]:
            problems.append(f"{_name(md_path, root)}:{line}: no heading for anchor {target!r}")
    return problems


# ---------------------------------------------------------------------------------------------------- commands

_SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "text"}
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_.:-]*|<[^>]*>|\{[^}]*\}")


def commands(text: str) -> list[tuple[int, str]]:
    """(line, command) of every ``fedge ...`` the text names: lines of shell-like fenced blocks that start with it
    (after an optional ``$ ``, continuation lines joined, ``&&`` / ``;`` chains split) and inline code spans that
    start with it (a table's ``\\|`` read as ``|``)."""
    prose, blocks = split_fences(text)
    found = []
    for first, info, lines in blocks:
        if info not in _SHELL_BLOCKS:
            continue
        number, pending, start = first, "", first
        for line in lines:
            if not pending:
                start = number
            stripped = line.strip()
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
            else:
                logical, pending = pending + stripped, ""
                for part in re.split(r"\s(?:&&|;)\s", logical):
                    part = re.sub(r"^\$\s+", "", part.strip())
                    if part.startswith("fedge "):
                        found.append((start, part))
            number += 1
    for m in _CODE_SPAN.finditer(prose):
        span = " ".join(m.group(2).replace("\\|", "|").split())
        if span.startswith("fedge "):
            found.append((_line(prose, m.start()), span))
    return sorted(found)


def _tokens(command: str) -> list[str]:
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain words will do for names and flags
        words = command.split()
    out = []
    for word in words[1:]:  # after "fedge"
        word = word.strip("[]()")  # `[--rounds R]`: the flag --rounds and its placeholder
        if not word.endswith("..."):
            word = word.rstrip(",;:.")  # prose punctuation: `fedge demo: its report ...` names `fedge demo`
        if word and not word.endswith("...") and word != "…":
            out.append(word)
    return out


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _values(action: argparse.Action) -> int:
    """How many words after the flag are its value (at most; ``*``/``+`` take every word to the next flag)."""
    nargs = action.nargs
    if nargs is None or nargs == "?":
        return 1
    if nargs in ("*", "+", argparse.REMAINDER):
        return 10**6
    return int(nargs)  # 0 for switches (store_true, BooleanOptionalAction, --help, --version)


def command_problems_of(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """What is wrong with one ``fedge ...`` command: an unknown subcommand word, or a ``--flag`` (``=value``
    stripped) that its (sub)parser does not have. ``a|b|c`` in a subcommand position names each alternative;
    placeholders (UPPER-CASE words, ``<...>``) there end the walk."""

    def walk(p: argparse.ArgumentParser, words: list[str], path: list[str]) -> list[str]:
        problems = []
        i = 0
        while i < len(words):
            word = words[i]
            if word.startswith("-") and word != "-":
                if word == "--":
                    break
                flag = word.split("=", 1)[0]
                action = p._option_string_actions.get(flag)
                if action is None:
                    problems.append(f"`{' '.join(path)}` has no option {flag}")
                    i += 1
                    continue
                i += 1
                if "=" not in word:
                    take = _values(action)
                    while take and i < len(words) and not words[i].startswith("-"):
                        i, take = i + 1, take - 1
                continue
            sub = _subparsers(p)
            if sub is None:
                i += 1  # a positional argument (a path, a domain, a placeholder)
                continue
            if _PLACEHOLDER.fullmatch(word):
                break  # `fedge COMMAND ...`: nothing more to check
            alternatives = word.split("|")
            for alt in alternatives:
                if alt not in sub.choices:
                    problems.append(f"`{' '.join(path)}` has no subcommand {alt!r}")
            for alt in alternatives:
                if alt in sub.choices:
                    problems += walk(sub.choices[alt], words[i + 1 :], [*path, alt])
            return problems
        return problems

    return walk(parser, _tokens(command), ["fedge"])


def command_problems(text: str, md_path: Path, parser: argparse.ArgumentParser, root: Path = ROOT) -> list[str]:
    """One message per problem of every ``fedge ...`` command in the text, naming the file, the line and the
    command."""
    return [
        f"{_name(md_path, root)}:{line}: {problem} (in `{command}`)"
        for line, command in commands(text)
        for problem in command_problems_of(parser, command)
    ]


# ---------------------------------------------------------------------------------------------------- the tests

DOCS = doc_files()


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from fedge.cli import build_parser  # imports no torch (the CLI's --help is fast for that reason)

    return build_parser()


def _read(md: Path) -> str:
    return md.read_text(encoding="utf-8")


def test_the_docs_are_there():
    names = {_name(md, ROOT) for md in DOCS}
    assert "README.md" in names
    assert any(name.startswith("docs/") for name in names), "no markdown files under docs/"


@pytest.mark.parametrize("md", DOCS, ids=lambda md: _name(md, ROOT))
def test_relative_links_point_at_files_that_exist(md):
    problems = link_problems(_read(md), md)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("md", DOCS, ids=lambda md: _name(md, ROOT))
def test_anchors_name_headings_that_exist(md):
    problems = anchor_problems(_read(md), md)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("md", DOCS, ids=lambda md: _name(md, ROOT))
def test_fedge_commands_exist_with_their_flags(md, parser):
    problems = command_problems(_read(md), md, parser)
    assert not problems, "\n".join(problems)


def test_the_readme_names_commands_and_links():
    """The checks see the README's content at all (a regex that matched nothing would pass everything)."""
    text = _read(ROOT / "README.md")
    assert len(commands(text)) >= 10
    assert len([t for _, t in links(text) if _local(t)]) >= 10


# ------------------------------------------------------------------------------- the checks catch a broken doc

BROKEN = """# A page

See [the demo](demo.md#a-heading-nobody-wrote) and [nothing](no/such/file.md) and ![a picture](images/none.png).
Fine: [web](https://example.org/x.md), [mail](mailto:someone@example.org), [here](#a-page), `[code](nope.md)`.

```bash
fedge server start --rounds 3 --no-such-flag 1
fedge serve start
$ fedge agent run|instal --config device.toml
```

Inline: `fedge demo --clients 2 --bogus=3` and `fedge model pul smollm2-135m`.
"""


def test_link_checks_report_a_broken_link_with_file_line_and_target(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "demo.md").write_text("# The demo\n", encoding="utf-8")
    md = tmp_path / "docs" / "page.md"
    assert link_problems(BROKEN, md, tmp_path) == [
        "docs/page.md:3: broken link 'no/such/file.md'",
        "docs/page.md:3: broken link 'images/none.png'",
    ]
    assert anchor_problems(BROKEN, md, tmp_path) == [
        "docs/page.md:3: no heading for anchor 'demo.md#a-heading-nobody-wrote'"
    ]


def test_command_checks_report_unknown_subcommands_and_flags(parser):
    problems = command_problems(BROKEN, ROOT / "docs" / "page.md", parser)
    assert problems == [
        "docs/page.md:7: `fedge server start` has no option --no-such-flag (in `fedge server start --rounds 3 "
        "--no-such-flag 1`)",
        "docs/page.md:8: `fedge` has no subcommand 'serve' (in `fedge serve start`)",
        "docs/page.md:9: `fedge agent` has no subcommand 'instal' (in `fedge agent run|instal --config device.toml`)",
        "docs/page.md:12: `fedge demo` has no option --bogus (in `fedge demo --clients 2 --bogus=3`)",
        "docs/page.md:12: `fedge model` has no subcommand 'pul' (in `fedge model pul smollm2-135m`)",
    ]


def test_placeholders_alternatives_and_optional_groups_pass(parser):
    fine = [
        "fedge server start [--config FILE] [--rounds R] [--min-clients K] [--address HOST:PORT] [--state DIR]",
        "fedge agent run|install|status|pause|resume|stop|logs --config device.toml",
        "fedge model pull smollm2-135m|gemma3-270m|PATH|org/name",
        "fedge export --adapter DIR --format onnx|gguf|hf [--quantize int8|int4] --out DIR",
        "fedge certs --host HOST [--node NAME ...]",
        "fedge --cache-dir DIR model list",
        "fedge COMMAND --help",
        'fedge generate --model tuned-int8 --prompt "Triage: fever 39.5C, SpO2 90%"   # a comment --not-a-flag',
        "fedge demo --devices base=laptop --devices base=pi5-8gb,slowdown=2",
    ]
    for command in fine:
        assert command_problems_of(parser, command) == [], command
    # a flag must still exist where an alternative is taken: pause has no --json, status has
    assert command_problems_of(parser, "fedge agent status|pause --json") == [
        "`fedge agent pause` has no option --json"
    ]


def test_a_temporary_copy_of_a_real_page_with_a_broken_link_and_an_unknown_flag_fails(parser):
    """A real page, copied and broken: the checks report exactly what was broken, at its line."""
    md = ROOT / "docs" / "deployment.md"
    if not md.is_file():
        md = ROOT / "README.md"
    good = _read(md)
    bad = (
        good.rstrip("\n")
        + "\n\nSee [the missing page](missing-page.md).\n\n```bash\nfedge client start --srever x:1\n```\n"
    )
    n = len(good.rstrip("\n").split("\n"))
    new_links = sorted(set(link_problems(bad, md)) - set(link_problems(good, md)))
    new_commands = sorted(set(command_problems(bad, md, parser)) - set(command_problems(good, md, parser)))
    assert new_links == [f"{_name(md, ROOT)}:{n + 2}: broken link 'missing-page.md'"]
    assert new_commands == [
        f"{_name(md, ROOT)}:{n + 5}: `fedge client start` has no option --srever (in `fedge client start --srever x:1`)"
    ]
