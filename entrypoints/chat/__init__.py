"""Talk to what a training run produced: `python -m entrypoints.chat --model URI` (see entrypoints/chat/cli.py).

source.py finds a result (manifest, latest.json, parts) and checks every file it loads against the manifest;
session.py loads the model (causal or encoder-decoder, with an adapter merged in memory) and streams answers;
cli.py is the command: an interactive chat, or one answer as JSON with `--prompt`.
"""
