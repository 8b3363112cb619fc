"""The cluster: ipyparallel engines joined in one torch.distributed process group.

``lifecycle`` starts, attaches to, restarts and stops it; ``calls`` runs work on its ranks
and waits for it; ``health`` tells a failed cell from a broken cluster; ``launch`` is the
entry point of the processes mpbook starts.
"""

from .calls import Calls
from .lifecycle import Cluster

__all__ = ["Calls", "Cluster"]
