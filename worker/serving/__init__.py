"""Downstream serving, with the artifact store and no database: `loading` loads a published version
with every file verified (`load_version`, the entry point for a team's own server), `served` decides
which version a server may answer with, `server` is `unlearn serve` (FastAPI over `model.versions`,
imported only by the command, so loading needs neither FastAPI nor Kafka).
"""

from worker.core.networks import NetworkUnavailable
from worker.serving.loading import LoadedVersion, VersionRevoked, load_version
from worker.serving.served import Announcement, ServedModel, ServingState

__all__ = ["Announcement", "LoadedVersion", "NetworkUnavailable", "ServedModel", "ServingState", "VersionRevoked",
           "load_version"]
