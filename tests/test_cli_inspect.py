"""``stitch-compile inspect``: the JSON object and the table, checked against independent counts."""

from __future__ import annotations

import json


from snnet_reference import V1_NAMED, V1_SHAPE, v1_cost, v1_reference, v2_reference



def _v1_costs(state):
    table, _ = v1_reference()
    return [v1_cost(state, *fields, 32) for fields in table]


def test_inspect_json_v1(cli, v1_ckpt):
    path, state = v1_ckpt
    code, out, err = cli("inspect", path, "--json")
    assert (code, err) == (0, "") and out.count("\n") == 1
    doc = json.loads(out)
    assert doc["family"] == "snnet_v1_vit"
    assert [a["embed_dim"] for a in doc["anchors"]] == list(V1_SHAPE["widths"])
    assert all(a["name"] for a in doc["anchors"])
    table, _ = v1_reference()
    assert [c["id"] for c in doc["configs"]] == list(range(71))
    for c, (comb, cfgs, layers), (flops, params) in zip(doc["configs"], table, _v1_costs(state)):
        assert type(c["flops"]) is int and type(c["params"]) is int
        assert (c["flops"], c["params"]) == (flops, params)
        assert (c["anchors"], c["positions"], c["layers"]) == (list(comb), [list(p) for p in cfgs], list(layers))
        assert c["route"][0] == f"stem:{comb[0]}" and c["route"][-1].endswith(f":{comb[-1]}")


def test_inspect_json_v2(cli, v2_ckpt):
    code, out, _ = cli("inspect", v2_ckpt[0], "--json")
    doc = json.loads(out)
    ref = v2_reference((12, 24))
    assert code == 0 and doc["family"] == "snnetv2_deit3"
    assert [c["id"] for c in doc["configs"]] == [i for i in range(135) if i != 13]
    assert all(c.get("ranges", []) == ref[c["id"]].get("route", []) for c in doc["configs"])


def test_inspect_table_v1(cli, v1_ckpt):
    path, state = v1_ckpt
    code, out, err = cli("inspect", path)
    assert (code, err) == (0, "")
    title, header, *rows = out.splitlines()
    assert "71 configs" in title and header.split() == ["id", "GFLOPs", "params(M)", "route"]
    assert len(rows) == 71
    for cid, (row, (flops, params)) in enumerate(zip(rows, _v1_costs(state))):
        assert row.split()[:3] == [str(cid), f"{flops / 1e9:.3f}", f"{params / 1e6:.2f}"]


def test_inspect_anchors_option(cli, v1_ckpt):
    code, out, err = cli("inspect", v1_ckpt[0], "--anchors", ",".join(V1_NAMED), "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert [a["name"] for a in doc["anchors"]] == V1_NAMED and len(doc["configs"]) == 71
