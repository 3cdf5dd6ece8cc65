"""Kronecker factor shapes: balanced / LoRA-like rules and explicit [m, n, p, q] specs."""

import pytest

from axolotl_soka.kron import SHAPE_RULES, KronShape, balanced_shape, divisors, lora_shape, resolve_shape


def brute_force_min_params(out_features: int, in_features: int) -> int:
    return min(
        m * n + (out_features // m) * (in_features // n)
        for m in range(1, out_features + 1)
        if out_features % m == 0
        for n in range(1, in_features + 1)
        if in_features % n == 0
    )


@pytest.mark.parametrize(
    ("out_features", "in_features", "expected"),
    [
        (4096, 4096, (64, 64, 64, 64)),
        (11008, 4096, (86, 64, 128, 64)),
        (576, 576, (24, 24, 24, 24)),
        (64, 64, (8, 8, 8, 8)),
        (96, 64, (8, 8, 12, 8)),
        (64, 96, (8, 8, 8, 12)),
        (32, 64, (4, 8, 8, 8)),
        # a prime dimension: only 1 and 97 divide it, so one side degenerates to (1, in, out, 1) = LoRA-like
        (97, 64, (1, 64, 97, 1)),
        (97, 89, (1, 89, 97, 1)),
    ],
)
def test_balanced_shape_known_answers(out_features, in_features, expected):
    shape = balanced_shape(out_features, in_features)
    assert shape.as_list() == list(expected)
    assert shape.out_features == out_features
    assert shape.in_features == in_features
    assert shape.params_per_term == brute_force_min_params(out_features, in_features)


def test_balanced_shape_llama_mlp_cost_is_the_brute_force_minimum():
    shape = balanced_shape(11008, 4096)
    assert shape.params_per_term == 86 * 64 + 128 * 64 == 13696
    assert brute_force_min_params(11008, 4096) == 13696
    assert shape.max_rank == min(86 * 64, 128 * 64) == 5504


def test_prime_dimension_max_rank():
    shape = balanced_shape(97, 64)
    assert shape.max_rank == 64  # min(m·n, p·q) = min(64, 97)
    assert shape.params_per_term == 64 + 97


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(97) == [1, 97]
    assert divisors(11008) == [d for d in range(1, 11009) if 11008 % d == 0]
    with pytest.raises(ValueError, match="size 0"):
        divisors(0)


def test_lora_shape():
    shape = lora_shape(96, 64)
    assert shape == KronShape(96, 1, 1, 64)
    assert shape.max_rank == 64  # min(m·n, p·q) = min(96, 64): the ordinary SVD rank of a 96×64 matrix
    assert shape.params_per_term == 96 + 64  # one term u·vᵀ
    assert (shape.out_features, shape.in_features) == (96, 64)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("balanced", KronShape(8, 8, 12, 8)),
        ("lora", KronShape(96, 1, 1, 64)),
        ([8, 8, 12, 8], KronShape(8, 8, 12, 8)),
        ((2, 32, 48, 2), KronShape(2, 32, 48, 2)),
        ([1, 64, 96, 1], KronShape(1, 64, 96, 1)),
    ],
)
def test_resolve_shape_valid(spec, expected):
    assert resolve_shape(spec, 96, 64, "model.layers.0.mlp.up_proj") == expected


@pytest.mark.parametrize(
    "spec",
    [
        [3, 3, 3, 3],
        [8, 8, 8, 8],  # m·p = 64 ≠ 96
        [12, 4, 8, 8],  # n·q = 32 ≠ 64
    ],
)
def test_resolve_shape_not_multiplying_out_names_module_dims_and_shape(spec):
    with pytest.raises(ValueError) as excinfo:
        resolve_shape(spec, 96, 64, "model.layers.0.mlp.up_proj")
    message = str(excinfo.value)
    for fragment in ("'model.layers.0.mlp.up_proj'", "out=96", "in=64", str(spec), "m*p", "n*q"):
        assert fragment in message


@pytest.mark.parametrize(
    "spec", [[8, 8, 12], [8, 8, 12, 8, 1], [0, 8, 12, 8], [8, 8, -12, 8], [8.0, 8, 12, 8]]
)
def test_resolve_shape_malformed_list(spec):
    with pytest.raises(ValueError) as excinfo:
        resolve_shape(spec, 96, 64, "model.layers.0.mlp.up_proj")
    message = str(excinfo.value)
    assert "'model.layers.0.mlp.up_proj'" in message
    assert "four positive integers [m, n, p, q]" in message


def test_resolve_shape_bool_is_not_an_integer():
    with pytest.raises(ValueError, match="four positive integers"):
        resolve_shape([True, 64, 96, True], 96, 64, "mod")


def test_resolve_shape_unknown_rule_lists_allowed_values():
    with pytest.raises(ValueError) as excinfo:
        resolve_shape("square", 96, 64, "model.layers.1.self_attn.q_proj")
    message = str(excinfo.value)
    assert "'square'" in message
    assert "'model.layers.1.self_attn.q_proj'" in message
    for rule in SHAPE_RULES:
        assert rule in message
    assert "[m, n, p, q]" in message
