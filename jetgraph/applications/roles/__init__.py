"""Component roles: which units write a set of target tokens, read from the bigram paths and
checked by interventions on real text.

**Ranking (data-free).** Every MLP unit u has the order-0 bigram path ``E→u→U``: the token's
embedding through u alone, decoded. For a target set T its centred target logit after a source
token z is

    c(z) = mean_{t∈T} [ℓ(z, t) − mean_v ℓ(z, v)],

how far the path lifts the targets above the average token (softmax ignores a shift shared by
all tokens). A path's **score** is c averaged over the 16 source tokens it lifts the targets
after most: a role is "writes the target after these tokens", and averaging over every token
would bury a rule with few triggers under the path's token-independent bias (``mean`` keeps
that average too). A pair of units (i before j) has the path ``E→i→j→U``, which exists only
when both do: its score is the pair's cooperation; ``joint`` adds the two single paths' scores.
``start="stream"`` reads each unit at its own input state on a one-token context instead
(``h_k→u→U``), which sees what earlier units wrote.

**Verification (on real text).** At every position whose next token is a target, the target's
centred logit is measured on the model and again with the unit (or both units of a pair)

- zero-ablated: its update γ(h) replaced by 0;
- mean-ablated: replaced by its mean over every real position of the text;
- with its path terms removed from the expansion: logits minus the unit's bigram path terms at
  that position's token (for a pair, the three paths inside it), the data-free prediction.

Each is reported as ΔLogit (edited minus clean, centred logits) with a bootstrap interval over
the positions, and beside it the same intervention's ΔLogit of the next token at other
positions of the text (``Effect.others``): an early unit that every token needs costs the
targets many logits when removed and every other token almost as many, which is damage, not a
role. Bigram paths are the paths through no attention unit (the paper's definition:
attention is the only unit that mixes positions, so a path that avoids it reads one token), so
attention units are not ranked; ``verify_roles(..., attention=True)`` ablates them too (zero and
mean), to show what the ranking cannot see.

The package, one job per module: :mod:`.report` (scores, effects and the report),
:mod:`.ranking` (the data-free ranking, planned), :mod:`.interventions` (the check on text).
"""

from jetgraph.applications.roles.interventions import (
    attention_units,
    check_text,
    control_positions,
    target_positions,
    unit_means,
    verify_roles,
)
from jetgraph.applications.roles.ranking import (
    CONTROLS,
    FULL_ROWS,
    LOGITS_PER_BATCH,
    LOGITS_PER_CALL,
    SAMPLED_ROWS,
    STARTS,
    block_rows,
    default_rows,
    forward_batch,
    mlp_units,
    path_logits,
    path_target_scores,
    role_plan,
    source_rows,
    unit_roles,
)
from jetgraph.applications.roles.report import (
    FOCUS,
    METHOD_NAMES,
    METHODS,
    Effect,
    PathScore,
    RoleReport,
)

__all__ = [
    "CONTROLS",
    "FOCUS",
    "FULL_ROWS",
    "LOGITS_PER_BATCH",
    "LOGITS_PER_CALL",
    "METHODS",
    "METHOD_NAMES",
    "SAMPLED_ROWS",
    "STARTS",
    "Effect",
    "PathScore",
    "RoleReport",
    "attention_units",
    "block_rows",
    "check_text",
    "control_positions",
    "default_rows",
    "forward_batch",
    "mlp_units",
    "path_logits",
    "path_target_scores",
    "role_plan",
    "source_rows",
    "target_positions",
    "unit_means",
    "unit_roles",
    "verify_roles",
]
