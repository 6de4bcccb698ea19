#!/usr/bin/env python3
"""Validates custom resources against the openAPIV3Schema of their CRD, offline.

usage: validate-cr.py CRD.yaml [--expect-invalid] MANIFEST.yaml...

Every document of a MANIFEST whose apiVersion/kind the CRD serves is checked against the served version's
schema, the way the apiserver's structural validation would, plus strictness: unknown fields are errors
(the apiserver would silently prune them, which hides typos). `nullable` is honoured and `x-kubernetes-*`
extensions are ignored. CEL rules (`x-kubernetes-validations`) are not evaluated here; they are listed so a
reader knows what only a real apiserver checks. With --expect-invalid every checked document must fail.
Documents of other kinds are skipped. Exit status 1 on any unexpected result.
"""
import sys

import jsonschema
import yaml


def to_json_schema(node):
    """Turns a structural schema into a JSON schema (draft 7) with unknown fields forbidden."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format", "description", "default"):
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_json_schema(value) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in value]
        else:
            out[key] = value
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    return out


def cel_rules(node, path="", acc=None):
    acc = [] if acc is None else acc
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            acc.append((path or ".", rule.get("rule")))
        for k, v in node.get("properties", {}).items():
            cel_rules(v, f"{path}.{k}", acc)
        if isinstance(node.get("items"), dict):
            cel_rules(node["items"], f"{path}[]", acc)
    return acc


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        crd = yaml.safe_load(f)
    expect_invalid = "--expect-invalid" in argv
    files = [a for a in argv[2:] if a != "--expect-invalid"]
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    schemas = {
        f"{group}/{v['name']}": v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v.get("served")
    }
    failures = 0
    checked = 0
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for i, doc in enumerate(docs):
            if doc.get("kind") != kind or doc.get("apiVersion") not in schemas:
                continue
            checked += 1
            schema = to_json_schema(schemas[doc["apiVersion"]])
            # metadata is validated by the apiserver, not by the CRD schema.
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            schema["properties"].setdefault("apiVersion", {"type": "string"})
            schema["properties"].setdefault("kind", {"type": "string"})
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            name = f"{path}#{i} {kind}/{doc.get('metadata', {}).get('name', '?')}"
            if expect_invalid:
                if errors:
                    print(f"ok (rejected as expected) {name}: {errors[0].message}")
                else:
                    print(f"FAIL {name}: expected a schema error, none found")
                    failures += 1
            elif errors:
                failures += 1
                for e in errors:
                    print(f"FAIL {name}: {'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}")
            else:
                print(f"ok {name}")
    if checked == 0:
        print(f"FAIL no {kind} documents found in {files}")
        return 1
    if not expect_invalid:
        rules = cel_rules(schemas[next(iter(schemas))])
        print(f"note: {len(rules)} CEL rule(s) are enforced by the apiserver only: " + "; ".join(r for _, r in rules))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
