"""Who may load, replace, unload and use a LoRA adapter, and from which paths.

Ownership (with API keys): an adapter loaded at run time belongs to the tenant
whose key loaded it; one the server knows without a record (``lora_modules`` at
startup, or loaded before this ingress restarted) belongs to the operator.
A tenant sees and uses the operator's adapters and its own. Another tenant's
adapter does not exist for it (404 on use and unload); replacing or unloading
one it cannot own is a 403. Names are one namespace, so loading a name another
owner holds is a 403 too. On an open server there are no tenants, and nothing
but the path rule below applies.

Paths: runtime loads read only directories under ``allowed_lora_roots`` (symlinks
resolved first); none configured means runtime loading is off. A path outside
the roots, missing, unreadable or without an adapter config gets one and the
same answer, so a client learns nothing about the server's file system.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from radixserve.cluster.openai_api.serving import APIError
from radixserve.engine.lora.adapter import CONFIG_FILE, WEIGHTS_FILE

OPERATOR = object()  # owner of adapters loaded with the server (lora_modules)

PATH_REFUSED = ("cannot load a LoRA adapter from this path: runtime loads must name a readable adapter "
                "directory under one of the server's allowed LoRA roots (--allowed-lora-roots; none "
                "configured means runtime loading is off)")


def path_refused() -> APIError:
    return APIError(403, PATH_REFUSED, param="lora_path", code="lora_path_not_allowed")


def allowed_lora_path(path: str, roots: Iterable[str]) -> str:
    """The real path of ``path`` when it is a readable adapter directory under a root
    (roots already resolved); ``path_refused()`` otherwise. Touches the disk: call it
    off the event loop."""
    try:
        real = os.path.realpath(path)
        inside = any(os.path.commonpath([real, root]) == root for root in roots)
    except (OSError, ValueError):  # a NUL byte, an unreadable cwd, ...
        raise path_refused() from None
    files = [os.path.join(real, name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    if not (inside and os.path.isdir(real) and all(os.access(f, os.R_OK) and os.path.isfile(f) for f in files)):
        raise path_refused()
    return real


class AdapterOwners:
    """Adapter name -> the tenant that loaded it at run time (held by the HTTP app)."""

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}

    def owner(self, name: str, known: Iterable[str]) -> object | str | None:
        """The tenant, OPERATOR (served without a record), or None (not loaded)."""
        if name in self._owners:
            return self._owners[name]
        return OPERATOR if name in known else None

    def visible(self, name: str, tenant: str | None, known: Iterable[str]) -> bool:
        owner = self.owner(name, known)
        return tenant is None or owner is OPERATOR or owner == tenant

    def claim(self, name: str, tenant: str | None, known: Iterable[str]) -> str | None:
        """Before a load: make ``tenant`` the owner (403 if someone else is); returns the
        previous record, for ``restore`` when the load fails."""
        previous = self._owners.get(name)
        if tenant is None:
            return previous
        owner = self.owner(name, known)
        if owner is not None and owner != tenant:
            raise APIError(403, f"the LoRA adapter name `{name}` belongs to another owner; choose another name",
                           param="lora_name", code="adapter_not_owned")
        self._owners[name] = tenant
        return previous

    def restore(self, name: str, previous: str | None) -> None:
        if previous is None:
            self._owners.pop(name, None)
        else:
            self._owners[name] = previous

    def check_unload(self, name: str, tenant: str | None, known: Iterable[str]) -> None:
        """404 for an adapter the tenant cannot see, 403 for the operator's."""
        owner = self.owner(name, known)
        if tenant is None or owner == tenant:
            return
        if owner is OPERATOR:
            raise APIError(403, f"the LoRA adapter `{name}` was loaded by the operator and cannot be "
                                "unloaded with an API key", param="lora_name", code="adapter_not_owned")
        raise not_loaded(name)

    def forget(self, name: str) -> None:
        self._owners.pop(name, None)


def not_loaded(name: str) -> APIError:
    return APIError(404, f"The LoRA adapter `{name}` is not loaded.", param="lora_name", code="model_not_found")
