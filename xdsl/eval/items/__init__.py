"""The registry of evaluate items: the one place an item is added (see `xdsl.eval.item`).

The checker takes the names, argument kinds and keywords of `evaluate` items from here, and
evaluation, sharded merging, the tables and the run summary dispatch through it.
"""

from xdsl.eval.item import EvaluateItem
from xdsl.eval.items.accuracy import Accuracy
from xdsl.eval.items.anytime import Anytime
from xdsl.eval.items.cohort import Cohort
from xdsl.eval.items.ensemble import Ensemble
from xdsl.eval.items.entropy import Entropy
from xdsl.eval.items.error_table import ErrorTable
from xdsl.eval.items.flatness import Flatness
from xdsl.eval.items.latency import Latency
from xdsl.eval.items.mapping import ChannelMapping
from xdsl.eval.items.ranked import Ranked
from xdsl.eval.items.retrieval import Retrieval
from xdsl.eval.items.xross import Xross
from xdsl.registry import Registry

__all__ = ["EVALUATIONS"]

EVALUATIONS: Registry[type[EvaluateItem]] = Registry("evaluation")
for _item in (Accuracy, Xross, Ensemble, Entropy, Flatness, ChannelMapping, Latency, Retrieval, Anytime, Cohort,
              Ranked, ErrorTable):
    EVALUATIONS.register(_item.name, _item)
