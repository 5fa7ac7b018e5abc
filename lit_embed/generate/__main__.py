"""``python -m lit_embed.generate DOCS OUT_DIR --llm URL --model NAME``: the same as ``lit-embed-generate``."""

from lit_embed.generate.pipeline import main

main()
