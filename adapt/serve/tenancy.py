"""Tenants and API keys: who may call, list and upload which tasks.

Keys are stored only as sha256 digests (`hash_key`); API keys are random tokens (`new_key`), so a fast
hash is enough and lookups are a dict access. A key file (JSON or YAML) looks like:

    {"tenants": [{"name": "aquarium-team", "key_sha256": "3f2a…", "tasks": ["icons-aquarium", "fish-*"]}],
     "admins":  [{"name": "ops", "key_sha256": "9b1c…"}]}

`tasks` entries are task names or shell-style patterns (`*` = every task). A tenant sees only the tasks
it may call; to it, every other task does not exist (the same 404 as a task that is really missing).
Admins may call and list every task and upload or delete adapters. Without a key file the server runs
"open": anyone may call and list every task, and nobody may upload.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The sha256 hex digest a key file stores for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "gak_" + secrets.token_urlsafe(32)


def read_key_file(path: str | Path) -> dict:
    """The raw content of a JSON or YAML key file (validated by `Tenancy.from_dict`)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


@dataclass(frozen=True)
class Tenant:
    name: str
    tasks: tuple[str, ...] = ()
    admin: bool = False

    def may_call(self, task: str) -> bool:
        return self.admin or any(fnmatch.fnmatchcase(task, pattern) for pattern in self.tasks)


OPEN_TENANT = Tenant("anonymous", ("*",))


class Tenancy:
    """Maps API keys (by digest) to tenants.

    Args:
        tenants: {sha256 hex digest of the key: Tenant}. Empty = open mode.
    """

    def __init__(self, tenants: dict[str, Tenant] | None = None):
        self._by_digest = dict(tenants or {})

    @property
    def open(self) -> bool:
        return not self._by_digest

    @classmethod
    def from_dict(cls, data: dict, source: str = "key config") -> "Tenancy":
        if not isinstance(data, dict) or not set(data) <= {"tenants", "admins"}:
            raise ValueError(f"{source}: expected an object with 'tenants' and/or 'admins' lists")
        tenants: dict[str, Tenant] = {}
        for group, admin in (("tenants", False), ("admins", True)):
            for index, entry in enumerate(data.get(group) or []):
                where = f"{source}: {group}[{index}]"
                if not isinstance(entry, dict) or "name" not in entry:
                    raise ValueError(f"{where} needs a 'name'")
                if "key" in entry:
                    raise ValueError(f"{where} holds a plain-text 'key'; store its digest as 'key_sha256' instead "
                                     "(`python -c \"from adapt.serve.tenancy import hash_key; print(hash_key('KEY'))\"`)")
                digest = str(entry.get("key_sha256", "")).lower()
                if not _HEX64.match(digest):
                    raise ValueError(f"{where} ({entry['name']!r}): 'key_sha256' must be 64 hex digits, "
                                     f"got {entry.get('key_sha256')!r}")
                if digest in tenants:
                    raise ValueError(f"{where}: the same key is configured twice")
                tasks = entry.get("tasks", [])
                if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
                    raise ValueError(f"{where}: 'tasks' must be a list of task names or patterns")
                tenants[digest] = Tenant(str(entry["name"]), tuple(tasks), admin)
        return cls(tenants)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tenancy":
        return cls.from_dict(read_key_file(path), source=str(path))

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant of `key`, OPEN_TENANT in open mode, None for a missing or unknown key."""
        if self.open:
            return OPEN_TENANT
        if not key:
            return None
        digest = hash_key(key)
        for known, tenant in self._by_digest.items():  # constant time in the key's value
            if hmac.compare_digest(known, digest):
                return tenant
        return None
