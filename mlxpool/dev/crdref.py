"""The CRD reference (docs/crd-reference.md), generated from the schemas in crds/.

`python -m mlxpool.dev.crdref` rewrites the file; `--check` exits 1 when it is not
current (tests/test_crd_reference.py runs the same comparison). One table per kind and
section (spec, status): every field by its dotted path, with type, whether it is
required, its limits (enum, bounds, pattern, default) and its description; then the
kind's CEL rules and printer columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mlxpool.dev.controlplane import REPO_ROOT

CRDS = REPO_ROOT / "crds"
REFERENCE = REPO_ROOT / "docs" / "crd-reference.md"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(schema: dict[str, Any]) -> str:
    kind = schema.get("type", "")
    if kind == "array":
        return f"[]{_type(schema.get('items') or {})}"
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    if kind == "object" and "additionalProperties" in schema and "properties" not in schema:
        return f"map[string]{_type(schema['additionalProperties'] or {})}"
    return kind or "any"


def _limits(schema: dict[str, Any]) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (("minimum", "≥"), ("maximum", "≤"), ("minLength", "length ≥"), ("maxLength", "length ≤"),
                       ("minItems", "items ≥"), ("maxItems", "items ≤"), ("maxProperties", "keys ≤")):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    if "default" in schema:
        parts.append(f"default `{json.dumps(schema['default'])}`")
    return "; ".join(parts)


def _fields(schema: dict[str, Any], prefix: str) -> Iterator[tuple[str, dict[str, Any], bool]]:
    required = set(schema.get("required") or [])
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}.{name}"
        yield path, sub, name in required
        if sub.get("type") == "object":
            yield from _fields(sub, path)
        elif sub.get("type") == "array" and (sub.get("items") or {}).get("type") == "object":
            yield from _fields(sub["items"], path + "[]")


def _rules(schema: dict[str, Any], prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield prefix, rule
    for name, sub in (schema.get("properties") or {}).items():
        yield from _rules(sub, f"{prefix}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _rules(schema["items"], prefix + "[]")


def render(crd_files: list[Path]) -> str:
    out = ["# CRD reference", "",
           "Generated from `crds/` by `python -m mlxpool.dev.crdref`; do not edit by hand "
           "(`tests/test_crd_reference.py` fails when it is stale).", ""]
    for path in crd_files:
        crd = yaml.safe_load(path.read_text())
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        names, spec = crd["spec"]["names"], crd["spec"]
        for version in spec["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            out += [f"## {names['kind']} (`{spec['group']}/{version['name']}`)", "",
                    _cell(schema.get("description", "")), "",
                    f"{spec['scope']}; plural `{names['plural']}`"
                    + (f", short names {', '.join(f'`{s}`' for s in names.get('shortNames', []))}"
                       if names.get("shortNames") else "")
                    + (", scale subresource" if "scale" in (version.get("subresources") or {}) else "") + ".", ""]
            for section in ("spec", "status"):
                if section not in (schema.get("properties") or {}):
                    continue
                out += [f"### {section}", "", "| field | type | required | limits | description |",
                        "|---|---|---|---|---|"]
                for field, sub, required in _fields(schema["properties"][section], section):
                    out.append(f"| `{field}` | {_type(sub)} | {'yes' if required else ''} | {_cell(_limits(sub))} "
                               f"| {_cell(sub.get('description', ''))} |")
                out.append("")
            rules = list(_rules(schema, ""))
            if rules:
                out += ["### Validation rules (CEL)", "", "| on | rule | message |", "|---|---|---|"]
                out += [f"| `{where.lstrip('.') or '(object)'}` | `{_cell(rule['rule'])}` | "
                        f"{_cell(rule.get('message', rule.get('messageExpression', '')))} |" for where, rule in rules]
                out.append("")
            columns = version.get("additionalPrinterColumns") or []
            if columns:
                out += ["### Printer columns (`kubectl get`)", "", "| column | from | shown |", "|---|---|---|"]
                out += [f"| {c['name']} | `{c['jsonPath']}` | {'with -o wide' if c.get('priority') else 'always'} |"
                        for c in columns]
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def current() -> str:
    return render(sorted(CRDS.glob("*.yaml")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlxpool.dev.crdref", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/crd-reference.md is not current")
    args = parser.parse_args(argv)
    text = current()
    if args.check:
        stale = not REFERENCE.exists() or REFERENCE.read_text() != text
        if stale:
            print(f"{REFERENCE} is stale: run python -m mlxpool.dev.crdref", file=sys.stderr)
        return 1 if stale else 0
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
