"""The statistical harness every distribution test uses: Pearson's chi-square with the cells of expected count
below 5 pooled into one, and its p-value. test_power.py builds its per-context, Bonferroni-corrected test and its
power calculation on these; test_exactness.py and test_fast.py compare sampled windows of tokens with the exact
joint distribution through chi_square_p_value."""
import torch


def chi2_sf(x, dof):
    """P(chi-square(dof) > x)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def pearson(observed, expected):
    """(statistic, degrees of freedom) of observed against expected counts (float64 tensors of one shape), with the
    cells of expected count < 5 pooled into one."""
    big = expected >= 5
    o, e = observed[big].tolist(), expected[big].tolist()
    if expected[~big].sum() > 0:
        o.append(float(observed[~big].sum()))
        e.append(float(expected[~big].sum()))
    return sum((oi - ei) ** 2 / ei for oi, ei in zip(o, e)), len(e) - 1


def chi_square_p_value(samples, exact):
    """Samples (hashable outcomes) against the exact distribution {outcome: probability}: the p-value."""
    outcomes = list(exact)
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    observed = torch.tensor([float(counts.get(s, 0)) for s in outcomes], dtype=torch.float64)
    expected = len(samples) * torch.tensor([exact[s] for s in outcomes], dtype=torch.float64)
    stat, dof = pearson(observed, expected)
    return chi2_sf(stat, dof)
