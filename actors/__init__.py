"""The actor tree: a Supervisor over one PoolActor per client, a ScalerActor and a DispatchActor."""

from actors.dispatch import DispatchActor, build_metadata, pool_id
from actors.pool import PoolActor
from actors.scaler import ScalerActor, next_target
from actors.supervisor import ChildSpec, Directory, Restart, Supervised, Supervisor

__all__ = [
    "ChildSpec",
    "Directory",
    "DispatchActor",
    "PoolActor",
    "Restart",
    "ScalerActor",
    "Supervised",
    "Supervisor",
    "build_metadata",
    "next_target",
    "pool_id",
]
