"""The result of explaining one prediction: paths, unexpanded groups, remainder, and the check
that they add up to the model's own target value."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from jetgraph.ir import DECODER_NAME

SUM_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
"""|listed + groups + remainder − target| and |remainder| (frozen method) allowed, relative to the
absolute mass of the decomposition (Σ|parts| + |target|), per dtype the program computes in."""


class DecompositionError(ArithmeticError):
    """The parts of an attribution do not add up to the model's target value."""


@dataclass(frozen=True)
class AttributedPath:
    """One path (``complete``) or one group of paths sharing a prefix (not ``complete``): where
    it starts (``source``, ``position``, ``token``), the units it passes, their degrees (the
    Taylor order each unit contributes), and its exact ``contribution`` to the target value."""

    source: str
    position: int | None
    token: int | None
    units: tuple[str, ...]
    degrees: tuple[int, ...]
    contribution: float
    complete: bool = True
    name: str | None = None  # the expansion's own name, degrees included (the jet method)

    @property
    def path(self) -> str:
        """In the path language: ``embed.token→attn0.h1→mlp2→unembed``; a group ends in ``→…``;
        a jet path keeps its degrees (``embed.token→attn0.h1^1→unembed^1``)."""
        if self.name is not None:
            return self.name
        steps = [self.source, *self.units]
        if self.source.startswith(f"{DECODER_NAME}."):
            return self.source  # the decoder's own constant
        return "→".join(steps) + (f"→{DECODER_NAME}" if self.complete else "→…")


@dataclass
class PathAttribution:
    """A prediction's target value decomposed into paths.

    ``value``: the model's own target value (the logit of ``target`` at ``position``, minus the
    logit of ``contrast`` when given). ``paths``: the listed paths, largest |contribution| first.
    ``groups``: the largest groups of paths not expanded, each with its exact total; ``rest_*``:
    the other unexpanded groups, summed (``rest_mass``: Σ|total|). ``remainder``:
    ``value − Σ paths − Σ groups − rest_total`` (rounding for the frozen method; the jets'
    remainder for the jet method). ``completeness``: the share of the value the listed paths
    carry, ``Σ paths / value`` (signed: paths of both signs can carry more than the value);
    ``mass_coverage``: the listed paths' share of the absolute mass,
    ``Σ|paths| / (Σ|paths| + Σ|groups| + rest_mass)``.
    """

    tokens: list[int]
    position: int
    target: int
    contrast: int | None
    value: float
    method: str
    granularity: str
    paths: list[AttributedPath]
    groups: list[AttributedPath]
    remainder: float
    expansions: int
    seconds: float
    stopped: str
    rest_total: float = 0.0
    rest_mass: float = 0.0
    rest_count: int = 0
    dtype: str = "float32"
    working_dtype: str = "float32"
    """The least precise dtype the program computes in (a float64 Llama takes its norms in
    float32): the decomposition is exact to its rounding."""
    labels: dict[int, str] = field(default_factory=dict, repr=False)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ the numbers
    @property
    def listed_total(self) -> float:
        return math.fsum(p.contribution for p in self.paths)

    @property
    def groups_total(self) -> float:
        return math.fsum(g.contribution for g in self.groups)

    @property
    def unexpanded_total(self) -> float:
        """Σ of every group not expanded (the kept ones and the rest)."""
        return self.groups_total + self.rest_total

    @property
    def completeness(self) -> float:
        return self.listed_total / self.value if self.value else float("nan")

    @property
    def mass_coverage(self) -> float:
        listed = math.fsum(abs(p.contribution) for p in self.paths)
        rest = math.fsum(abs(g.contribution) for g in self.groups) + self.rest_mass
        return listed / (listed + rest) if listed + rest > 0 else 1.0

    def check(self, tolerance: float, remainder_is_rounding: bool) -> None:
        """Raise :class:`DecompositionError` unless paths + groups + remainder = value (and, for
        an exact decomposition, the remainder is rounding) within ``tolerance`` of the mass."""
        mass = (math.fsum(abs(p.contribution) for p in self.paths + self.groups) + self.rest_mass
                + abs(self.value) + abs(self.remainder))
        parts = self.listed_total + self.unexpanded_total + self.remainder
        if abs(parts - self.value) > tolerance * mass:
            raise DecompositionError(f"paths + groups + remainder = {parts:.6g}, but the model's target "
                                     f"value is {self.value:.6g}")
        if remainder_is_rounding and abs(self.remainder) > tolerance * mass:
            raise DecompositionError(
                f"the exact decomposition leaves {self.remainder:.3g} of {self.value:.6g} unexplained "
                f"(allowed {tolerance:g} of the mass {mass:.3g}): the frozen network does not "
                "reproduce the model on this input")

    # ------------------------------------------------------------ presenting
    def label(self, token: int | None) -> str:
        if token is None:
            return ""
        return self.labels.get(token, str(token))

    def rows(self, top: int | None = None) -> list[dict[str, object]]:
        """The listed paths as table rows: rank, source token, position, path, contribution,
        share, cumulative share (of the target value)."""
        rows, cumulative = [], 0.0
        for rank, path in enumerate(self.paths[:top] if top else self.paths, 1):
            cumulative += path.contribution
            rows.append({"rank": rank, "position": "" if path.position is None else path.position,
                         "token": self.label(path.token), "path": path.path,
                         "degrees": " ".join(map(str, path.degrees)),
                         "contribution": path.contribution,
                         "share": path.contribution / self.value if self.value else float("nan"),
                         "cumulative_share": cumulative / self.value if self.value else float("nan")})
        return rows

    def table(self, top: int = 20) -> str:
        """A plain-text report: what is explained, the ranked paths, and the accounts."""
        what = f"logit({self.label(self.target)!r})"
        if self.contrast is not None:
            what += f" − logit({self.label(self.contrast)!r})"
        lines = [f"{what} at position {self.position} = {self.value:.4f}   "
                 f"[{self.method}, {self.granularity} granularity, {self.dtype}"
                 + (f", parts in {self.working_dtype}" if self.working_dtype != self.dtype else "") + "]"]
        rows = self.rows(top)
        header = ("rank", "pos", "token", "path", "contribution", "share", "cumulative")
        cells = [header] + [(str(r["rank"]), str(r["position"]), repr(r["token"]) if r["token"] != "" else "",
                             str(r["path"]), f"{r['contribution']:+.4f}", f"{r['share']:+.1%}",
                             f"{r['cumulative_share']:+.1%}") for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        for i, row in enumerate(cells):
            lines.append("  ".join(c.ljust(w) if j in (2, 3) else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(row, widths, strict=True))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        shown = math.fsum(float(r["contribution"]) for r in rows)
        lines += [
            f"listed paths: {len(self.paths)} (shown {len(rows)}: {shown:+.4f}; "
            f"all listed: {self.listed_total:+.4f})",
            f"unexpanded groups: {len(self.groups) + self.rest_count:,}, total {self.unexpanded_total:+.4f}"
            f" (largest: {self.groups[0].path} {self.groups[0].contribution:+.4f})" if self.groups else
            "unexpanded groups: none",
            f"remainder: {self.remainder:+.3g}",
            f"completeness {self.completeness:+.1%} (listed paths / value); mass coverage "
            f"{self.mass_coverage:.1%}; {self.expansions} expansions in {self.seconds:.2f} s "
            f"({self.stopped})",
        ]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_json(self) -> str:
        """Everything, as JSON (paths and groups with their fields; the accounts)."""
        data = {k: v for k, v in asdict(self).items() if k not in ("labels", "paths", "groups")}
        data |= {"target_text": self.label(self.target), "contrast_text": self.label(self.contrast),
                 "completeness": self.completeness, "mass_coverage": self.mass_coverage,
                 "listed_total": self.listed_total, "unexpanded_total": self.unexpanded_total,
                 "paths": [self._record(p) for p in self.paths],
                 "groups": [self._record(g) for g in self.groups]}
        return json.dumps(data, indent=1)

    def _record(self, path: AttributedPath) -> dict[str, object]:
        fields = {k: v for k, v in asdict(path).items() if k != "name"}
        return fields | {"path": path.path, "token_text": self.label(path.token)}

    def to_graph_json(self, slug: str = "jetgraph-explain", layers: int | None = None) -> dict:
        """The attribution-graph JSON of circuit-tracer's frontend and Neuronpedia
        (:mod:`jetgraph.applications.explain.graph_json`)."""
        from jetgraph.applications.explain.graph_json import to_graph_json

        return to_graph_json(self, slug, layers)

    def _repr_html_(self) -> str:
        from jetgraph.applications.report.inline import attribution_html

        return attribution_html(self)

    def show(self):
        """The path graph explorer inline in a notebook."""
        from jetgraph.applications.report import explorer

        return explorer(self)

    def to_html(self, path: str | Path) -> Path:
        """This attribution as a self-contained HTML explorer (:func:`jetgraph.report`)."""
        from jetgraph.applications.report import attribution_title, report

        return report(self, path=path, title=attribution_title(self))

    def to_csv(self) -> str:
        """The listed paths, one row each (the columns of :meth:`rows`)."""
        buffer = io.StringIO()
        rows = self.rows()
        fields = ["rank", "position", "token", "path", "degrees", "contribution", "share", "cumulative_share"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


__all__ = ["SUM_TOLERANCE", "AttributedPath", "DecompositionError", "PathAttribution"]
