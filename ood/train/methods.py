"""`ood methods`: what each registered training method is, from its objective."""

from __future__ import annotations

from ood.train import METHODS, method_head, objective_class


def describe() -> list[str]:
    lines = []
    for name in METHODS:
        cls = objective_class(name)
        params = ", ".join(f"{k}={v}" for k, v in cls.defaults.items()) or "none"
        outliers = "auxiliary outlier set (methods.<m>.outliers)" if cls.outliers else "none"
        lines += [
            f"{name}: {cls.summary}",
            f"    paper: {cls.paper}",
            f"    backbone: {cls.backbone}; head: {method_head(name)}",
            f"    views per image: {cls.views}",
            f"    outliers: {outliers}",
            f"    paper's scorers: {', '.join(cls.scorers)}",
            f"    parameters: {params}",
        ]
    return lines


def describe_markdown() -> str:
    """The README's methods table (a test keeps the README equal to this)."""
    lines = [
        "| method | paper | backbone (paper) | objective | outliers | paper's scorers "
        "| parameters (default) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        cls = objective_class(name)
        params = ", ".join(f"`{k}` ({v!r})" for k, v in cls.defaults.items()) or "-"
        lines.append(
            f"| `{name}` | {cls.paper} | {cls.backbone} | {cls.summary} "
            f"| {'yes' if cls.outliers else '-'} | {', '.join(cls.scorers)} | {params} |"
        )
    return "\n".join(lines) + "\n"
