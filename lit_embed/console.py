"""What reaches the user's console: our progress, results and warnings, not third-party tips and chatter.

Each filter names one message and where it comes from; everything else (lit_embed's own warnings included) is
shown as it was.
"""

from __future__ import annotations

import logging
import warnings

import transformers

# (message regex, module that warns): notices about code that is not ours, or that do not apply to a run.
THIRD_PARTY_WARNINGS = (
    # torch deprecated LeafSpec; Lightning's CombinedLoader still builds one for every training loader.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # Lightning counts log_every_n_steps over the whole run, not per epoch: small epochs are still logged.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", r"lightning\.pytorch\.loops"),
)
# Lightning's advertisements for its cloud services, printed at every run.
LIGHTNING_TIP = "💡 Tip:"
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_TIP)


def quiet_third_party_output() -> None:
    """No per-file weight-loading bars, save notices, Lightning tips or third-party deprecation notices."""
    transformers.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _not_a_tip not in logger.filters:
            logger.addFilter(_not_a_tip)
    for message, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
