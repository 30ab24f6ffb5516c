# SPDX-License-Identifier: Apache-2.0
"""Bench helpers that pick what a GPU run does next: the MFU combo (bench/train_throughput.py) and the
local-recipe sweep's cost (bench/recipe_sweep.py)."""

import importlib.util
import sys

import yaml


def _bench(project_root, name):
    sys.path.insert(0, str(project_root / "bench"))
    spec = importlib.util.spec_from_file_location(name, project_root / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_combo_merges_keepable_winners_one_per_group(project_root):
    t = _bench(project_root, "train_throughput")
    results = {
        "cluster-80gb": {"tokens_per_s": 100.0},
        "try:512x16": {"tokens_per_s": 103.0, "peak_mem_gib": 58.0},
        "try:1024x10": {"tokens_per_s": 104.0, "peak_mem_gib": 69.0},  # same group (shape), faster: wins it
        "try:fused-adamw": {"tokens_per_s": 102.5, "peak_mem_gib": 58.0},
        "try:1024x16": {"tokens_per_s": 130.0, "peak_mem_gib": 100.0},  # not keepable (H200 only)
        "try:packing-no-neat": {"tokens_per_s": 120.0, "peak_mem_gib": 55.0},  # not keepable (another training)
        "try:torch-compile": {"error": "rc=1"},
    }
    picked = t.combo(results)
    assert picked["names"] == ["try:1024x10", "try:fused-adamw"]
    assert picked["overrides"] == {"per_device_train_batch_size": 10, "optim": "adamw_torch_fused"}


def test_combo_leaves_out_small_gains_and_what_does_not_fit_80gb(project_root):
    t = _bench(project_root, "train_throughput")
    results = {
        "cluster-80gb": {"tokens_per_s": 100.0},
        "try:fused-adamw": {"tokens_per_s": 101.0, "peak_mem_gib": 58.0},  # under COMBO_GAIN
        "try:1024x10": {"tokens_per_s": 110.0, "peak_mem_gib": 79.0},  # over FITS_80GB_GIB
    }
    assert t.combo(results) == {"names": [], "overrides": {}}
    assert t.combo({"try:512x16": {"tokens_per_s": 1e6, "peak_mem_gib": 1.0}})["names"] == []  # no baseline


def test_sweep_cost_is_rows_times_epochs_relative_to_the_recipe(project_root):
    s = _bench(project_root, "recipe_sweep")
    recipe = yaml.safe_load(s.RECIPE.read_text())
    assert s.cost(recipe, {}) == 1.0
    assert s.cost(recipe, {"per_device_train_batch_size": 1, "learning_rate": 1e-3}) == 1.0
    assert s.cost(recipe, {"max_samples": recipe["max_samples"] * 2}) == 2.0
    assert s.cost(recipe, {"num_train_epochs": 2.0}) == 2.0
    round2 = s.ROUNDS[1]
    assert set(round2) < set(s.GRID) and "base" not in round2
    # the rounds cover the grid once, in order, each starting at its named first point
    assert [n for r in s.ROUNDS for n in r] == list(s.GRID)
    assert [r[0] for r in s.ROUNDS] == list(s.ROUND_STARTS)
