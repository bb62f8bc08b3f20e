"""What the operator is asked to approve: the whole request, in plain words, safe to show.

Three rules hold for every consent text the gate produces (``pending``, the desktop dialog,
``show``), and this module is the only place that builds one:

1. **Nothing the agent chose is shown raw.** A description is made of :class:`Line`\\ s whose
   parts are either the gate's own words (plain ``str``, printable ASCII, checked) or
   :class:`Val` — an agent-chosen value, passed through :func:`escape` when rendered. Every
   line starts with the gate's own words, so no agent value can begin a line, and the rendered
   text is printable ASCII and newlines only: no terminal escape, no carriage return, no bidi
   control or right-to-left letter reordering what surrounds it, no look-alike letter, no
   line or paragraph separator.
2. **Every field is shown.** Each operation is described by a plain-language first line and
   then one line per field of its payload, looping over the operations table, so a field added
   to the table is described without anyone remembering to. Values come from the decided
   arguments (``Verdict.args``), i.e. what the handler will act on. Standard input is part of
   the request: its size, SHA-256 and content. A firewall request shows the current rules beside
   the new ones as a diff.
3. **Nothing is cut.** If the whole description fits the consent view (:data:`VIEW_MAX_LINES`
   lines, :data:`VIEW_MAX_CHARS` characters) it is shown whole. Otherwise the view is a summary
   that names everything it does not show — which value or which lines, their size and SHA-256
   — and ``qubes-mcp-admin show ID`` prints the whole request. The operator's answer is bound to
   the digest of the whole request (``consent.request_digest``), never to the text, so
   approving a summary approves exactly the full request. Lines the operator must see (what a
   step destroys, a rule that opens the network, the start of standard input) are never folded
   while lines of detail can be.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from qubes_mcp.dom0.decide import Birth
from qubes_mcp.dom0.facts import Facts
from qubes_mcp.dom0.firewall import parse_rule_line, render_rule
from qubes_mcp.dom0.operations import Field, Operation
from qubes_mcp.dom0.plans import Plan, PlanStep

#: the consent view (terminal summary and desktop dialog): at most this many lines …
VIEW_MAX_LINES = 60
#: … and this many characters; a longer request is summarised, never cut
VIEW_MAX_CHARS = 4000
#: in a summary, a value whose escaped form is longer than this shows its head and tail only
ELIDE_OVER = 96
_HEAD, _TAIL = 48, 32
#: in a summary, a line longer than this (after eliding values) keeps its first and last parts
#: (about this many characters of each) and names the parts in between
LINE_MAX = 400
_LINE_HEAD, _LINE_TAIL = 240, 120
#: standard input is shown in lines of at most this many characters …
STDIN_WRAP = 100
#: … and its first bytes, at most so many lines (the preview), are never folded away
STDIN_PREVIEW = 1024
STDIN_PREVIEW_LINES = 12
#: the hex digits of a SHA-256 shown for a hidden part (the whole digest for standard input)
_SHORT_HASH = 16

# --- 1. escaping ----------------------------------------------------------------------------

#: everything but printable ASCII, and the backslash that starts an escape
_UNSAFE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
_UNSAFE_QUOTED = re.compile(r"[^\x20-\x26\x28-\x5b\x5d-\x7e]")
_NAMED = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(untrusted_value: str, *, quote: bool = False) -> str:
    """The one function through which an agent-chosen value reaches the operator's eyes.

    Printable ASCII stays as it is; everything else is written as a visible escape: ``\\n``,
    ``\\r``, ``\\t``, ``\\xNN`` (C0, DEL, C1 and Latin-1), ``\\uNNNN`` / ``\\UNNNNNNNN`` (all
    other code points: bidi overrides and isolates, zero-width and other format characters,
    line and paragraph separators, surrogates, and letters too — a right-to-left letter
    reorders the text around it in a dialog without any control character, and a look-alike
    letter can pass for an ASCII one). The backslash itself becomes ``\\\\``, so the mapping is
    one-to-one; with ``quote`` the single quote becomes ``\\'`` too, for values shown between
    quotes. The result never holds a line break, so an agent value cannot start a line.
    """
    pattern = _UNSAFE_QUOTED if quote else _UNSAFE
    return pattern.sub(_escape_char, untrusted_value)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utf8(value: str) -> bytes:
    """The bytes of an agent string as the gate hashes and sends them (lone surrogates kept)."""
    return value.encode("utf-8", "surrogatepass")


# --- 2. lines made of the gate's words and agent values ---------------------------------------


@dataclass(frozen=True)
class Val:
    """A value the agent chose (or one built from its input): always escaped when shown."""

    label: str  #: the gate's name for it in a summary, e.g. ``command[2]``
    value: str
    quote: bool = False

    def full(self) -> str:
        text = escape(self.value, quote=self.quote)
        return f"'{text}'" if self.quote else text

    def compact(self) -> tuple[str, bool]:
        """Head and tail with the size and digest of the whole, if the value is long."""
        text = escape(self.value, quote=self.quote)
        if len(text) <= ELIDE_OVER:
            return self.full(), False
        raw = utf8(self.value)
        quote = "'" if self.quote else ""
        head = _escaped_within(self.value, _HEAD, self.quote, from_end=False)
        tail = _escaped_within(self.value, _TAIL, self.quote, from_end=True)
        note = f"[{self.label}: {len(raw):,} bytes, sha256 {_sha256(raw)[:_SHORT_HASH]}]"
        return f"{quote}{head}{quote}...{quote}{tail}{quote}{note}", True


def _escaped_within(value: str, width: int, quote: bool, *, from_end: bool) -> str:
    """The longest head (or tail) of ``value`` whose escaped form fits ``width`` characters."""
    out: list[str] = []
    used = 0
    for ch in reversed(value) if from_end else value:
        piece = escape(ch, quote=quote)
        if used + len(piece) > width:
            break
        out.append(piece)
        used += len(piece)
    return "".join(reversed(out) if from_end else out)


Part = str | Val
_GATE_WORDS = re.compile(r"\A[\x20-\x7e]*\Z")


@dataclass(frozen=True)
class Line:
    """One line of a description. ``key`` lines are never folded away in a summary."""

    parts: tuple[Part, ...]
    key: bool = True
    #: the gate's name for this line when a summary folds it, e.g. ``new rule 3``
    label: str = ""

    def __post_init__(self) -> None:
        # a programming error, never agent input: fail closed (the request is refused)
        if not self.parts or not isinstance(self.parts[0], str) or not self.parts[0].strip():
            raise ValueError("a consent line starts with the gate's own words")
        for part in self.parts:
            if isinstance(part, str) and not _GATE_WORDS.match(part):
                raise ValueError("the gate's own words are printable ASCII")

    def indented(self, prefix: str) -> Line:
        return Line((prefix + str(self.parts[0]), *self.parts[1:]), self.key, self.label)

    def full(self) -> str:
        return self._full

    def compact(self) -> str:
        return self._compact

    @cached_property
    def _full(self) -> str:
        return "".join(p if isinstance(p, str) else p.full() for p in self.parts)

    @cached_property
    def _compact(self) -> str:
        """Long values elided; a line still too long (a command of many arguments) keeps its
        head and tail parts and names the parts between, with their size and digest."""
        texts = [p if isinstance(p, str) else p.compact()[0] for p in self.parts]
        if sum(map(len, texts)) <= LINE_MAX:
            return "".join(texts)
        head, used = 1, len(texts[0])  # the gate's first words always stay
        while head < len(texts) and used + len(texts[head]) <= _LINE_HEAD:
            used, head = used + len(texts[head]), head + 1
        tail, used = len(texts), 0
        while tail > head and used + len(texts[tail - 1]) <= _LINE_TAIL:
            used, tail = used + len(texts[tail - 1]), tail - 1
        middle = self.parts[head:tail]
        labels = [p.label for p in middle if isinstance(p, Val)] or ["words"]
        which = labels[0] if len(labels) == 1 else f"{labels[0]} to {labels[-1]}"
        raw = utf8("".join(p if isinstance(p, str) else p.full() for p in middle))
        note = f" ...[{which}: {len(raw):,} bytes, sha256 {_sha256(raw)[:_SHORT_HASH]}]..."
        return "".join(texts[:head]) + note + "".join(texts[tail:])


@dataclass(frozen=True)
class View:
    """What the consent view shows, and whether it is a summary of the whole request."""

    text: str
    shortened: bool


def _fits(texts: Sequence[str]) -> bool:
    return len(texts) <= VIEW_MAX_LINES and sum(len(t) + 1 for t in texts) <= VIEW_MAX_CHARS


def _fold(lines: Sequence[Line]) -> str:
    """The one line that stands for folded ``lines``: which, how many, size and digest."""
    raw = utf8("\n".join(line.full() for line in lines))
    first, last = lines[0].label or "line", lines[-1].label or "line"
    which = first if len(lines) == 1 else f"{first} to {last}"
    return (
        f"  [{len(lines)} line(s) hidden: {which}; {len(raw):,} bytes, "
        f"sha256 {_sha256(raw)[:_SHORT_HASH]}]"
    )


@dataclass(frozen=True)
class Description:
    """A whole request in words. ``full_text`` is everything; ``view`` fits the consent view."""

    lines: tuple[Line, ...]

    def full_text(self) -> str:
        return "\n".join(line.full() for line in self.lines)

    def view(self, request_id: str) -> View:
        """The whole text if it fits; else a summary naming each hidden part (see module doc)."""
        full = [line.full() for line in self.lines]
        if _fits(full):
            return View("\n".join(full), False)
        footer = [
            "  (shortened to fit this view: each hidden part is named with its size and "
            f"sha256; `qubes-mcp-admin show {escape(request_id)}` prints the whole request, "
            "and approving approves all of it)"
        ]
        # a: long values show head and tail
        compact = [line.compact() for line in self.lines]
        if _fits(compact + footer):
            return View("\n".join(compact + footer), True)
        # b: runs of detail lines fold into one line each, key lines stay; then each run, in
        # order, shows as many of its first lines as still fit
        entries: list[list[Line]] = []
        for line in self.lines:
            if not line.key and entries and not entries[-1][0].key:
                entries[-1].append(line)
            else:
                entries.append([line])
        shown = [_entry(e, len(e) if e[0].key else 0) for e in entries]
        if _fits(_flat(shown) + footer):
            for index, entry in enumerate(entries):
                if entry[0].key:
                    continue
                low, high = 0, len(entry)  # the most lines of this run that fit: bisect
                while low < high:
                    count = (low + high + 1) // 2
                    wider = [*shown[:index], _entry(entry, count), *shown[index + 1 :]]
                    if _fits(_flat(wider) + footer):
                        low, shown = count, wider
                    else:
                        high = count - 1
            return View("\n".join(_flat(shown) + footer), True)
        # c: the first entries that fit (what needs consent comes first), the rest folded
        kept: list[str] = []
        for index in range(len(entries)):
            rest = [line for e in entries[index:] for line in e]
            texts = _flat(shown[index : index + 1])
            if not _fits([*kept, *texts, _fold(rest), *footer]):
                return View("\n".join([*kept, _fold(rest), *footer]), True)
            kept += texts
        return View("\n".join(kept + footer), True)  # pragma: no cover - b would have fit


def _entry(lines: Sequence[Line], count: int) -> list[str]:
    """The first ``count`` of ``lines`` (compact), and one line standing for the rest."""
    rest = lines[count:]
    return [line.compact() for line in lines[:count]] + ([_fold(rest)] if rest else [])


def _flat(entries: Sequence[list[str]]) -> list[str]:
    return [text for entry in entries for text in entry]


# --- 3. operations in words ---------------------------------------------------------------------


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB"


def _head(
    op: Operation,
    target: Val,
    args: Mapping[str, Any],
    *,
    facts: Facts | None,
    birth: Birth | None,
    where: str,
) -> tuple[Part, ...]:
    """The plain-language sentence: what will happen, to which qube."""
    q = facts.get(target.value) if facts is not None else None

    def arg(name: str, *, quote: bool = False) -> Val:
        value = args.get(name)
        return Val(f"{where}{name}", "none" if value is None else str(value), quote)

    name = op.name
    if name == "qube.remove":
        what: tuple[Part, ...] = ()
        if q is not None:
            what = (
                " (",
                Val(f"{where}class", q.klass),
                f", private volume {_gib(q.private_size)})",
            )
        return ("REMOVE qube ", target, *what, ": the qube and all data in it will be lost")
    if name == "qube.revert":
        revision: tuple[Part, ...] = (
            ("revision ", arg("revision"))
            if args.get("revision") is not None
            else ("its newest revision",)
        )
        return (
            "REVERT the private volume of qube ",
            target,
            " to ",
            *revision,
            ": everything written to its private volume (/rw, /home) since that revision is lost",
        )
    if name == "qube.log":
        return ("READ the console log of qube ", target)
    if name == "qube.kill":
        return ("KILL qube ", target, " at once: unsaved state in it is lost")
    if name in ("qube.start", "qube.shutdown", "qube.pause", "qube.unpause"):
        verb = {"qube.shutdown": "SHUT DOWN"}.get(name, name.split(".")[1].upper())
        force = " even if other qubes use its network" if args.get("force") is True else ""
        return (f"{verb} qube ", target, force)
    if name == "qube.run":
        return ("RUN a command as root in ", target, " (started if needed)")
    if name == "template.update":
        return (
            "UPDATE the packages of template ",
            target,
            " through its scope's egress qube (network), then shut it down",
        )
    if name == "disposable.run":
        return ("RUN a command as root in a new disposable of ", target, ", then destroy it")
    if name == "file.read":
        return ("READ the file ", arg("path", quote=True), " in ", target)
    if name == "file.write":
        mode = {"create": "CREATE", "overwrite": "OVERWRITE", "append": "APPEND TO"}
        return (
            f"{mode.get(str(args.get('mode')), 'WRITE')} the file ",
            arg("path", quote=True),
            " in ",
            target,
        )
    if name == "file.copy":
        return (
            "COPY files from ",
            target,
            " to ",
            arg("destination"),
            " (they land in ~/QubesIncoming/",
            target,
            "/ there)",
        )
    if name == "firewall.set":
        return ("REPLACE the firewall of ", target, " (first matching rule wins)")
    if name == "link.open":
        return (
            "LINK ",
            target,
            " to ",
            arg("server"),
            ": localhost:",
            arg("port"),
            " in ",
            target,
            " will reach TCP port ",
            arg("port"),
            " on 127.0.0.1 of ",
            arg("server"),
            " (qubes.ConnectTCP; nothing else, no outside network)",
        )
    if name == "link.close":
        return ("CLOSE the link from ", target, " to ", arg("server"), " port ", arg("port"))
    if name in ("qube.create", "disposable.create", "qube.clone"):
        verb = {
            "qube.create": "CREATE a new app qube from template ",
            "disposable.create": "CREATE a new disposable of ",
            "qube.clone": "CLONE qube ",
        }[name]
        parts: tuple[Part, ...] = (verb, target)
        if birth is not None:
            net: Part = "none" if birth.netvm is None else Val(f"{where}netvm", birth.netvm)
            parts += (
                ": it joins the agent's scope at tier ",
                Val(f"{where}tier", birth.tier.word),
                ", network ",
                net,
            )
        return parts
    if name == "property.set":
        return ("SET property ", arg("property"), " of ", target, " to ", arg("value", quote=True))
    if name == "feature.set":
        return ("SET feature ", arg("feature"), " of ", target, " to ", arg("value", quote=True))
    if name in ("device.attach", "device.detach"):
        verb, prep = ("ATTACH", "to") if name == "device.attach" else ("DETACH", "from")
        ro = " read-only" if args.get("read_only") is True else ""
        return (
            f"{verb} ",
            arg("devclass"),
            " device ",
            arg("backend"),
            ":",
            arg("device"),
            f" {prep} ",
            target,
            ro,
        )
    return (f"{name} on ", target)


def _stdin_lines(f: Field, value: str, where: str, raw: bytes | None = None) -> list[Line]:
    """Standard input (or bytes to write): size and digest (the exact bytes the qube gets),
    then its content in short lines; the preview (the first :data:`STDIN_PREVIEW` bytes, at
    most :data:`STDIN_PREVIEW_LINES` lines) is never folded. ``raw`` is given for base64
    fields: ``value`` is then its bytes one character each (escaped like any agent text)."""
    raw = utf8(value) if raw is None else raw
    if not raw:
        return [Line((f"  {f.name}: (empty)",), label=f"{where}{f.name}")]
    lines = [
        Line(
            (f"  {f.name}: {len(raw):,} bytes, sha256 {_sha256(raw)}, content:",),
            label=f"{where}{f.name}",
        )
    ]
    offset = 0
    number = 0
    for piece in value.splitlines(keepends=True):
        for start in range(0, len(piece), STDIN_WRAP):
            chunk = piece[start : start + STDIN_WRAP]
            number += 1
            label = f"{where}{f.name} line {number}"
            lines.append(
                Line(
                    ("    | ", Val(label, chunk)),
                    key=offset < STDIN_PREVIEW and number <= STDIN_PREVIEW_LINES,
                    label=label,
                )
            )
            offset += len(utf8(chunk))
    return lines


def _rules_lines(f: Field, value: object, current: Sequence[str] | None, where: str) -> list[Line]:
    """The new rules beside the current ones, as a diff. Lines that open the network (a new
    accept, a drop that goes away) are key lines; the rest may fold in a summary."""
    rules: list[dict[str, object]] = [
        r if isinstance(r, dict) and "action" in r else {"action": str(r)} for r in _as_list(value)
    ]
    new = [render_rule(r) for r in rules]
    opens = [r.get("action") == "accept" for r in rules]
    label = f"{where}{f.name}"
    if current is None:
        head = f"  {f.name}: {len(new)} rule(s); the current rules are not known here"
        lines = [Line((head,), label=label)]
        lines += [
            Line((f"  + #{j + 1} ", Val(f"{label} #{j + 1}", text)), opens[j], f"new rule {j + 1}")
            for j, text in enumerate(new)
        ]
    else:
        current = [_canonical(line) for line in current]
        head = f"  {f.name}: {len(current)} now, {len(new)} after (+ added, - removed, = kept)"
        lines = [Line((head,), label=label)]
        matcher = difflib.SequenceMatcher(None, list(current), new, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                lines += [
                    Line(
                        (f"  = #{j + 1} ", Val(f"{label} #{j + 1}", new[j])), False, f"rule {j + 1}"
                    )
                    for j in range(j1, j2)
                ]
                continue
            for i in range(i1, i2):
                was = parse_rule_line(current[i]).get("action") == "drop"
                lines.append(
                    Line(
                        (f"  - was #{i + 1} ", Val(f"current rule {i + 1}", current[i])),
                        was,
                        f"current rule {i + 1}",
                    )
                )
            for j in range(j1, j2):
                lines.append(
                    Line(
                        (f"  + #{j + 1} ", Val(f"{label} #{j + 1}", new[j])),
                        opens[j],
                        f"new rule {j + 1}",
                    )
                )
    if not new:
        lines.append(Line(("  (no rules: the qube's traffic is all dropped)",)))
    return lines


_RULE_KEYS = frozenset(
    (
        "action",
        "proto",
        "dst4",
        "dst6",
        "dsthost",
        "dstports",
        "icmptype",
        "specialtarget",
        "comment",
    )
)


def _canonical(line: str) -> str:
    """A current rule as ``render_rule`` writes the new ones, so the diff compares like with
    like; a line with anything render_rule does not know (``expire=``) is shown as qubesd has
    it."""
    rule = parse_rule_line(line)
    return render_rule(rule) if "action" in rule and set(rule) <= _RULE_KEYS else line


def _as_list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _field_lines(f: Field, value: object, current: Sequence[str] | None, where: str) -> list[Line]:
    label = f"{where}{f.name}"
    if f.kind == "text" and isinstance(value, str):
        return _stdin_lines(f, value, where)
    if f.kind == "base64" and isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:  # the schema refused it already; show it as the text it is
            return _stdin_lines(f, value, where)
        return _stdin_lines(f, raw.decode("latin-1"), where, raw)
    if f.kind == "rules":
        return _rules_lines(f, value, current, where)
    if f.kind in ("argv", "steps") and isinstance(value, list | tuple):
        items: list[Part] = []
        for i, item in enumerate(value):
            items += [" ", Val(f"{label}[{i}]", str(item), quote=True)]
        return [Line((f"  {f.name} ({len(value)} item(s)):", *items), label=label)]
    if value is None:
        return [Line((f"  {f.name}: (not set)",), label=label)]
    if isinstance(value, bool):
        return [Line((f"  {f.name}: {'yes' if value else 'no'}",), label=label)]
    if isinstance(value, int):
        unit = {"timeout": " seconds", "seconds": " seconds"}.get(f.name, "")
        if f.name.endswith("_size"):
            unit = f" bytes ({_gib(value)})"
        return [Line((f"  {f.name}: {value}{unit}",), label=label)]
    return [Line((f"  {f.name}: ", Val(label, str(value), quote=f.kind == "str")), label=label)]


def request_lines(
    op: Operation,
    target: str | None,
    args: Mapping[str, Any],
    *,
    facts: Facts | None = None,
    birth: Birth | None = None,
    current_rules: Sequence[str] | None = None,
    where: str = "",
) -> list[Line]:
    """One request: the sentence, then every field of the operation from ``args``."""
    shown_target = Val(f"{where}target", target or "dom0")
    lines = [
        Line(
            (op.name + ": ", *_head(op, shown_target, args, facts=facts, birth=birth, where=where))
        )
    ]
    for f in op.fields:
        lines += _field_lines(f, args.get(f.name), current_rules, where)
    return lines


def describe(
    op: Operation,
    target: str | None,
    args: Mapping[str, Any],
    *,
    facts: Facts | None = None,
    birth: Birth | None = None,
    current_rules: Sequence[str] | None = None,
) -> Description:
    """What a single request will do, built from its decided arguments (``Verdict.args``)."""
    return Description(
        tuple(
            request_lines(op, target, args, facts=facts, birth=birth, current_rules=current_rules)
        )
    )


@dataclass(frozen=True)
class StepContext:
    """What the gate read to describe one plan step (nothing for a deferred step)."""

    facts: Facts | None = None
    current_rules: Sequence[str] | None = None


def _rank(step: PlanStep) -> int:
    """What the operator must see first: steps that need consent, then destructive ones."""
    return 0 if step.consent else 1 if step.op.destructive else 2


def describe_plan(plan: Plan, context: Mapping[int, StepContext] | None = None) -> Description:
    """Every step with the same words a single request gets; steps that need consent first,
    then the other destructive ones, then the rest — each group in the order it runs."""
    context = context or {}
    total = len(plan.steps)
    lines = [
        Line(
            (
                "plan.apply: APPLY PLAN ",
                Val("title", plan.title, quote=True),
                f" ({total} step(s); those that need your consent first, then other "
                "destructive ones, then the rest; step numbers give the order they run in)",
            )
        )
    ]
    for step in sorted(plan.steps, key=lambda s: (_rank(s), s.index)):
        where = f"step {step.index + 1} "
        tags = " [needs consent]" if step.consent else ""
        tags += " [deferred: about a qube this plan creates; decided when it runs]" * step.deferred
        ctx = context.get(step.index, StepContext())
        body = request_lines(
            step.op,
            step.target,
            step.args,
            facts=ctx.facts,
            current_rules=ctx.current_rules,
            where=where,
        )
        lines.append(body[0].indented(f"  step {step.index + 1} of {total}{tags}: "))
        lines += [line.indented("    ") for line in body[1:]]
    return Description(tuple(lines))
