"""The bottom floor: vocabulary every layer of bergson may import, and which imports nothing of
ours but :mod:`bergson.errors`: module and column layouts (:mod:`.layout`), atomic file writes and
setting differences (:mod:`.files`), device resolution (:mod:`.devices`), the sink interface
(:mod:`.sinks`), unit-normalized rows (:mod:`.rows`) and the command table (:mod:`.commands`)."""
