"""A small name -> factory registry, one per extension point (models, datasets, ...).

A decorator fills the dict, duplicates raise, and an unknown name gives a clear error
with close matches (the torchvision/timm pattern).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from imgcls.errors import ImgclsError, did_you_mean

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    def __init__(self, kind: str, list_command: str | None = None):
        self.kind = kind
        self.list_command = list_command
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._items[key] = fn
            return fn

        return deco

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str, extra_choices: list[str] | None = None) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise self.unknown(name, extra_choices) from None

    def unknown(self, name: str, extra_choices: list[str] | None = None) -> ImgclsError:
        hint = did_you_mean(name, [*self._items, *(extra_choices or [])])
        listing = f"`{self.list_command}` lists them" if self.list_command else (
            "known: " + ", ".join(self.names()))
        return ImgclsError(f"unknown {self.kind} '{name}'", f"{hint} {listing}".strip())
