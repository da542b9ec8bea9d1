"""The conversion report: what happened to every module."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

REPLACED = "replaced"
KEPT = "kept"
GATED = "gated"
REFUSED = "refused"
LEFT = "left (strict=False)"
UNUSED = "unused"
VERIFIED = "verified"  # the conversion-time verification (equivalence and completeness errors in the note)
READ = "read"  # a container without a rule whose forward was read from its graph and found exact
CONSTANT = "constant"  # a parameter (or a module's output) added to the value path as a constant (explained per sample)
SHIFTED = "shifted"  # a strided layer that samples one position later (``center_grid``)
FOLDED = "folded"  # a fixed input map (``transform_input``) folded into the input normalization


def type_name(obj: object) -> str:
    """``module.QualName`` of the object's class, the way the report names types."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class ReportEntry:
    path: str
    old_type: str
    action: str
    new_type: str = ""
    note: str = ""


@dataclass
class ConversionReport:
    """Per module path: old type -> new type, left as is, or refused (with the reason)."""

    entries: list[ReportEntry] = field(default_factory=list)

    def add(self, path: str, old: nn.Module | nn.Parameter, action: str, new: nn.Module | None = None,
            note: str = "") -> None:
        self.entries.append(ReportEntry(path or "<model>", type_name(old), action,
                                        type_name(new) if new is not None else "", note))

    def by_action(self, action: str) -> list[ReportEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def refused(self) -> list[ReportEntry]:
        return self.by_action(REFUSED)

    @property
    def constants(self) -> list[str]:
        """Paths of the parameters added to the value path as constants (positional embeddings, tokens), and of the
        modules whose outputs are such constants (computed from the input's shape alone)."""
        return [e.path for e in self.by_action(CONSTANT)]

    @property
    def leftovers(self) -> list[ReportEntry]:
        """Modules on the value path that were neither converted nor known to be safe."""
        return self.by_action(REFUSED) + self.by_action(LEFT)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.action] = out.get(e.action, 0) + 1
        return out

    def to_dict(self) -> list[dict[str, str]]:
        return [asdict(e) for e in self.entries]

    @classmethod
    def from_dict(cls, rows: list[dict[str, str]]) -> "ConversionReport":
        return cls([ReportEntry(**row) for row in rows])

    def table(self, short_types: bool = True) -> str:
        """The report as an aligned text table (one row per module)."""

        def short(name: str) -> str:
            return name.rsplit(".", 1)[-1] if short_types and name else name

        rows = [("module", "old type", "action", "new type", "note")]
        rows += [(e.path, short(e.old_type), e.action, short(e.new_type), e.note) for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else ""))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        summary = ", ".join(f"{n} {a}" for a, n in self.counts().items())
        return "\n".join(lines + ["", f"{len(self.entries)} modules: {summary}"])

    def __str__(self) -> str:
        return self.table()
