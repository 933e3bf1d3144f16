"""load_state_dict's own work where torch's hooks see it. torch runs the optimizer's load_state_dict pre-hooks
first (one may return another dict) and its post-hooks last; a class that checked or kept tensors of the dict it
was given, and put them back after torch's load, checked the wrong dict and undid a post-hook's change. Here a
class's checks run as the last pre-hook, on the dict torch loads, and its fixes of the loaded state as the first
post-hook, before the user's."""
from __future__ import annotations

from typing import Callable


def load_between_hooks(optimizer, load: Callable[[], None], before: Callable[[dict], object] | None = None,
                       after: Callable[[object], None] | None = None) -> None:
    """Run load() (torch's load_state_dict of `optimizer`) with before(state_dict) as the optimizer's last
    load_state_dict pre-hook and after(what before returned) as its first post-hook; both hooks are removed
    when load() returns or raises. before may raise: torch has changed nothing then."""
    seen = []

    def pre(_, state_dict):
        seen.append(before(state_dict) if before is not None else None)

    def post(_):
        if after is not None and seen:
            after(seen[-1])

    handles = [optimizer.register_load_state_dict_pre_hook(pre),
               optimizer.register_load_state_dict_post_hook(post, prepend=True)]
    try:
        load()
    finally:
        for handle in handles:
            handle.remove()
