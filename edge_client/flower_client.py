"""fedge 0.2's path to the ClientApp, ``fedge.edge_client.flower_client:app``, kept for run configs and user mods
that name it. The ClientApp is `fedge.edge_client.federation.clientapp`; import it from there."""

import warnings

from fedge.edge_client.federation.clientapp import app

__all__ = ["app"]

warnings.warn(
    "fedge.edge_client.flower_client is now fedge.edge_client.federation.clientapp: update the import or the "
    "clientapp setting (the old path still works)",
    DeprecationWarning,
    stacklevel=2,
)
