"""The Taylor engine on closed-form functions: exactness, multivariate partials, every rule."""

from __future__ import annotations

import math

import pytest
import sympy as sp
import torch

import jetgraph
from jetgraph.taylor import Basis, Series, run_series
from jetgraph.taylor.elementwise import EXPRESSIONS
from tests.taylor_oracles import nested_jvp_coefficients, relative_error

torch.manual_seed(0)
F64 = torch.float64


def test_polynomial_is_exact_at_its_degree() -> None:
    f = lambda x: x + x**2 + x**3  # noqa: E731
    c, y = torch.randn(7, dtype=F64), torch.randn(7, dtype=F64)
    torch.testing.assert_close(jetgraph.jet(f, c, y, order=3).value, f(y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jetgraph.jet(f, c, y, order=5).value, f(y), rtol=1e-12, atol=1e-12)
    assert (jetgraph.jet(f, c, y, order=2).value - f(y)).abs().max() > 1e-3


def test_quadratic_and_cubic_tensor_forms_are_exact() -> None:
    d = 6
    a, b, c3 = (torch.randn(d, d, dtype=F64) for _ in range(3))

    def quadratic(x: torch.Tensor) -> torch.Tensor:
        return ((x @ a) * x).sum(-1)

    def cubic(x: torch.Tensor) -> torch.Tensor:
        return ((x @ a) * (x @ b) * (x @ c3)).sum(-1)

    center, point = torch.randn(3, d, dtype=F64), torch.randn(3, d, dtype=F64)
    torch.testing.assert_close(jetgraph.jet(quadratic, center, point, order=2).value, quadratic(point))
    torch.testing.assert_close(jetgraph.jet(cubic, center, point, order=3).value, cubic(point))
    assert (jetgraph.jet(cubic, center, point, order=2).value - cubic(point)).abs().max() > 1e-6


def test_analytic_two_dimensional_function_mixed_partials() -> None:
    """sin(x0 + 3 x1 + x0³ x1): multivariate coefficients are ∂^α f / α! (checked with sympy)."""
    x0, x1 = sp.symbols("x0 x1")
    expr = sp.sin(x0 + 3 * x1 + x0**3 * x1)
    point = {x0: 0.3, x1: -0.7}

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x[..., 0] + 3 * x[..., 1] + x[..., 0] ** 3 * x[..., 1])

    center = torch.tensor([0.3, -0.7], dtype=F64)
    e0, e1 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    result = jetgraph.jet(f, center, order=3, directions=[e0, e1])
    for alpha in result.monomials:
        derivative = sp.diff(expr, x0, alpha[0], x1, alpha[1]) if sum(alpha) else expr
        expected = float(derivative.subs(point)) / (math.factorial(alpha[0]) * math.factorial(alpha[1]))
        assert result.coefficient(alpha).item() == pytest.approx(expected, rel=1e-10, abs=1e-12), alpha


def test_multivariate_matches_nested_jvp_on_tensors() -> None:
    w = torch.randn(8, 8, dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w) * torch.sigmoid(x)

    c = torch.randn(4, 8, dtype=F64)
    v1, v2 = torch.randn_like(c), torch.randn_like(c)
    result = jetgraph.jet(f, c, order=3, directions=[v1, v2])
    d1 = lambda x: torch.func.jvp(f, (x,), (v1,))[1]  # noqa: E731
    d12 = lambda x: torch.func.jvp(d1, (x,), (v2,))[1]  # noqa: E731
    torch.testing.assert_close(result.coefficient((1, 1)), d12(c))
    torch.testing.assert_close(result.coefficient((2, 1)), torch.func.jvp(d12, (c,), (v1,))[1] / 2)
    assert result.basis.size == 10  # monomials of degree <= 3 in 2 variables
    # the sum over monomials is the jet at c + v1 + v2, which also equals the univariate jet
    univariate = jetgraph.jet(f, c, v1 + v2, order=3, increment=True)
    torch.testing.assert_close(result.value, univariate.value)
    torch.testing.assert_close(result.by_order(), univariate.by_order())


SCALAR_FUNCTIONS = {
    "exp": (torch.exp, sp.exp),
    "log": (torch.log, sp.log),
    "reciprocal": (torch.reciprocal, lambda x: 1 / x),
    "sqrt": (torch.sqrt, sp.sqrt),
    "rsqrt": (torch.rsqrt, lambda x: 1 / sp.sqrt(x)),
    "pow_1.5": (lambda x: x**1.5, lambda x: x ** sp.Rational(3, 2)),
    "pow_3": (lambda x: x**3, lambda x: x**3),
    "div": (lambda x: (x + 2) / (x * x + 1), lambda x: (x + 2) / (x * x + 1)),
    "relu": (torch.relu, lambda x: x),  # evaluated at x > 0: the active branch
    **{name: (getattr(torch.nn.functional, name, None) or getattr(torch, name), None) for name in ()},
}
for _name in EXPRESSIONS:
    _torch = {
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "sin": torch.sin,
        "cos": torch.cos, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    }[_name]
    SCALAR_FUNCTIONS[_name] = (_torch, EXPRESSIONS[_name])


@pytest.mark.parametrize("name", sorted(SCALAR_FUNCTIONS))
def test_elementwise_rules_match_sympy_series(name: str) -> None:
    """Every elementwise rule (recurrence or sympy-derived) against sympy's Taylor coefficients."""
    torch_fn, sympy_fn = SCALAR_FUNCTIONS[name]
    x = sp.Symbol("x")
    expr = sympy_fn(x) if callable(sympy_fn) and not isinstance(sympy_fn, sp.Expr) else sympy_fn
    if isinstance(expr, sp.Expr) and expr.free_symbols and x not in expr.free_symbols:
        expr = expr.subs(next(iter(expr.free_symbols)), x)
    points = [0.4, 1.3, 2.2]
    order = 5
    center = torch.tensor(points, dtype=F64)
    result = jetgraph.jet(torch_fn, center, torch.ones_like(center), order=order, increment=True)
    for i, p in enumerate(points):
        for j in range(order + 1):
            expected = float(sp.diff(expr, x, j).subs(x, p)) / math.factorial(j)
            assert result.coefficients[j, i].item() == pytest.approx(expected, rel=1e-9, abs=1e-11), (p, j)


def test_softmax_and_log_softmax_match_nested_jvp() -> None:
    c, v = torch.randn(3, 7, dtype=F64), torch.randn(3, 7, dtype=F64)
    for fn in (lambda x: torch.softmax(x, -1), lambda x: torch.log_softmax(x, -1)):
        ours = jetgraph.jet(fn, c, v, order=4, increment=True)
        for j, expected in enumerate(nested_jvp_coefficients(fn, c, v, 4)):
            assert relative_error(ours.coefficients[j], expected) < 1e-12


def test_masked_softmax_keeps_masked_entries_zero() -> None:
    mask = torch.ones(5, 5, dtype=torch.bool).tril()

    def attention(x: torch.Tensor) -> torch.Tensor:
        scores = (x @ x.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, -1) @ x

    c, v = torch.randn(2, 5, 4, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    ours = jetgraph.jet(attention, c, v, order=3, increment=True)
    assert torch.isfinite(ours.coefficients).all()
    for j, expected in enumerate(nested_jvp_coefficients(attention, c, v, 3)):
        assert relative_error(ours.coefficients[j], expected) < 1e-12


def test_batch_of_centers_in_one_pass_matches_one_by_one() -> None:
    w = torch.randn(6, 6, dtype=F64)
    f = lambda x: torch.nn.functional.gelu(x @ w)  # noqa: E731
    centers, increments = torch.randn(4, 3, 6, dtype=F64), torch.randn(4, 3, 6, dtype=F64)
    batched = jetgraph.jet(f, centers, increments, order=3, increment=True)
    for i in range(4):
        single = jetgraph.jet(f, centers[i], increments[i], order=3, increment=True)
        torch.testing.assert_close(batched.coefficients[:, i], single.coefficients)


def test_order_zero_is_the_value_at_the_center() -> None:
    c, y = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    result = jetgraph.jet(torch.tanh, c, y, order=0)
    torch.testing.assert_close(result.value, torch.tanh(c))


def test_basis_sizes_and_product_tables() -> None:
    assert Basis(1, 4).size == 5 and Basis(3, 2).size == 10 and Basis(2, 3).size == 10
    basis = Basis(2, 2)
    a = Series(torch.randn(basis.size, 3, dtype=F64), basis)
    b = Series(torch.randn(basis.size, 3, dtype=F64), basis)
    from jetgraph.taylor.series import mul

    product = mul(a, b).coeffs
    for alpha, i in basis.index.items():
        expected = torch.zeros(3, dtype=F64)
        for beta in basis.monomials:
            gamma = tuple(x - y for x, y in zip(alpha, beta, strict=True))
            if min(gamma) >= 0:
                expected += a.coeffs[basis.index[beta]] * b.coeffs[basis.index[gamma]]
        torch.testing.assert_close(product[i], expected)


def test_missing_rule_raises_jet_rule_error() -> None:
    with pytest.raises(jetgraph.JetRuleError, match=r"aten\.lgamma.*rules\.py"):
        jetgraph.jet(lambda x: torch.lgamma(x), torch.rand(4) + 1, torch.randn(4), order=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"order": -1}, ValueError, "non-negative"),
        ({"order": 2, "variate": torch.randn(4)}, ValueError, "shape"),
        ({"order": 2}, ValueError, "give a variate"),
        ({"order": 2, "variate": torch.randn(3), "directions": [torch.randn(3)]}, ValueError, "not both"),
        ({"order": 2, "directions": []}, ValueError, "at least one"),
    ],
)
def test_jet_argument_errors(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        jetgraph.jet(torch.tanh, torch.randn(3), **kwargs)


def test_interpreter_constant_inputs_pass_through() -> None:
    graph_module = jetgraph.taylor.trace_callable(lambda x: x * 2 + 1, torch.randn(3))
    basis = Basis(1, 2)
    out = run_series(graph_module, Series(torch.randn(3, 3), basis))
    assert isinstance(out, Series) and out.coeffs.shape == (3, 3)


def test_a_basis_of_many_directions_is_made_degree_by_degree() -> None:
    """The monomials of total degree ≤ order, in the documented order (by degree, then by the
    exponents reversed), equal the filtered (order+1)^n grid; 64 directions build at once (the
    grid would hold 2^64)."""
    import itertools

    from jetgraph.taylor import Basis

    for directions, order in [(1, 0), (1, 5), (3, 2), (4, 3), (2, 4), (5, 1)]:
        grid = [a for a in itertools.product(range(order + 1), repeat=directions) if sum(a) <= order]
        grid.sort(key=lambda a: (sum(a), tuple(-x for x in a)))
        assert list(Basis(directions, order).monomials) == grid
    wide = Basis(64, 1)
    assert wide.size == 65 and wide.unit(63) == 64
