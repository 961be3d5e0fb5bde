"""Diversity of generated solutions: normalisation, distinct counts, pairwise similarity."""

import math

import pytest

from learnforget.score.diversity import distinct_solutions, diversity, mean_pairwise_similarity, normalise_code

# The same algorithm, written four ways: comments, docstring, whitespace, names.
SAME = [
    "    total = 0\n    for x in numbers:\n        total += x * x\n    return total\n",
    "    # sum of squares\n    acc = 0\n    for value in numbers:  # each one\n        acc   +=   value*value\n    return acc\n",
    '    """Square and add."""\n    s = 0\n\n    for n in numbers:\n        s += (n * n)\n    return s',
    "\ttotal = 0\n\tfor item in numbers:\n\t\ttotal += item * item\n\treturn total\n",
]
# Different algorithms for the same problem.
DIFFERENT = [
    SAME[0],
    "    return sum(x ** 2 for x in numbers)\n",
    "    def square(v):\n        return v * v\n    return sum(map(square, numbers))\n",
    "    import functools\n    return functools.reduce(lambda a, b: a + b * b, numbers, 0)\n",
]


def test_normalise_removes_comments_docstrings_whitespace_and_names():
    forms = {normalise_code(t) for t in SAME}
    assert len(forms) == 1
    form = forms.pop()
    assert "#" not in form and "Square" not in form
    assert "numbers" in form  # the parameter (not bound here) keeps its name


def test_normalise_keeps_builtins_attributes_and_free_names():
    form = normalise_code("    result = sorted(numbers, key=abs)\n    return result.copy()\n")
    assert form == "v0 = sorted(numbers, key=abs)\nreturn v0.copy()"


def test_normalise_falls_back_for_code_that_does_not_parse():
    a = normalise_code("    return (x +\n      # comment\n   y")
    b = normalise_code("    return (x +   y")
    assert a == b == "return (x + y"


def test_distinct_solutions():
    assert distinct_solutions(SAME) == 1
    assert distinct_solutions(DIFFERENT) == 4
    assert distinct_solutions(SAME + DIFFERENT) == 4
    assert distinct_solutions([]) == 0
    assert distinct_solutions(["", "   \n"]) == 1


def test_mean_pairwise_similarity_bounds():
    assert mean_pairwise_similarity(SAME) == pytest.approx(1.0)
    diverse = mean_pairwise_similarity(DIFFERENT)
    assert 0.0 <= diverse < 0.6
    assert mean_pairwise_similarity(["    return 1\n", "    yield from range(10)\n"]) < 0.5
    partly = mean_pairwise_similarity([SAME[0], SAME[0].replace("x * x", "x * x * x")])
    assert diverse < partly < 1.0
    assert math.isnan(mean_pairwise_similarity([SAME[0]]))
    assert math.isnan(mean_pairwise_similarity([]))


def test_diversity_per_problem_and_means():
    samples = ([{"task_id": "A", "completion": t} for t in SAME]
               + [{"task_id": "B", "completion": t} for t in DIFFERENT]
               + [{"task_id": "C", "completion": SAME[0]}])
    result = diversity(samples)
    assert result["n_problems"] == 3
    a, b, c = (result["per_problem"][k] for k in "ABC")
    assert (a["n_samples"], a["distinct"], a["distinct_fraction"]) == (4, 1, 0.25)
    assert a["mean_pairwise_similarity"] == pytest.approx(1.0)
    assert (b["distinct"], b["distinct_fraction"]) == (4, 1.0)
    assert math.isnan(c["mean_pairwise_similarity"]) and c["distinct"] == 1
    assert result["mean"]["distinct"] == pytest.approx(2.0)
    assert result["mean"]["distinct_fraction"] == pytest.approx((0.25 + 1.0 + 1.0) / 3)
    assert result["mean"]["mean_pairwise_similarity"] == pytest.approx(
        (1.0 + b["mean_pairwise_similarity"]) / 2)


def test_diversity_rejects_bad_samples():
    with pytest.raises(ValueError, match="sample 1"):
        diversity([{"task_id": "A", "completion": ""}, {"task_id": "A"}])
