"""A station's programme: what it plays by itself, hour by hour, and what listeners add to it.

- `options`: the per-station settings (`[[stations.schedule]]` day-parts, listener mode, skip
  threshold, ...) as frozen dataclasses that `radio.config` reads from `config.toml`.
- `schedule`: day-part slots in the station's time zone, as instants (midnight, daylight-saving).
- `rotation`: which of a slot's prompts plays at each rotation tick (listed or shuffled).
- `votes`: the listeners' suggestion queue, upvotes and skip votes, rate-limited, bounded.
- `director`: combines them with admin pins into "play this, from then, because of that".

Everything here is pure logic over an injected clock (Unix seconds): no asyncio, no torch.
`docs/programming.md` explains the rules with a café's week as the example.
"""
