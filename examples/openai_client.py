# SPDX-License-Identifier: Apache-2.0
"""Query the served fine-tuned model with the `openai` package, as the tutorial does:
``model="<model_id>:<lora_id>"`` and a streamed answer.

Usage (with `e2e-llm serve --profile local --publish latest` running):
    python examples/openai_client.py                                  # the first row of the profile's val split
    python examples/openai_client.py "Is Diablo II on the Mac?"       # a sentence of your own
    E2E_LLM_MODEL=smollm2-135m:viggo-v1 python examples/openai_client.py   # a pinned version

Environment: E2E_LLM_PROFILE (default local; `e2e-llm serve --then` sets it), E2E_LLM_BASE_URL
(default http://localhost:8000/v1), E2E_LLM_MODEL (default <model.id>:<data.dataset>, the alias
`e2e-llm serve --publish` and `e2e-llm publish --alias <data.dataset>` maintain), E2E_LLM_API_KEY
(when the service has auth on; any string otherwise). The system prompt is the one the profile's
adapters were trained with (its data.system_prompt, else the task's instruction); an adapter asked
with another answers worse.
"""

import json
import os
import sys

from openai import OpenAI

from e2e_llm import storage
from e2e_llm.config import load_profile

profile = os.environ.get("E2E_LLM_PROFILE", "local")
config = load_profile(profile)
base_url = os.environ.get("E2E_LLM_BASE_URL", "http://localhost:8000/v1")
model = os.environ.get("E2E_LLM_MODEL", f"{config.model.id}:{config.data.dataset}")
if len(sys.argv) > 1:
    sentence, reference = " ".join(sys.argv[1:]), None
else:  # any task: a held-out row of the profile's own data, as `e2e-llm data` wrote it
    split = config.storage_uri("data", config.data.dataset, f"{config.batch.split}.jsonl")
    if not storage.exists(split, **config.storage_kw()):
        sys.exit(f"{split} not found: pass a sentence, or run `e2e-llm data --profile {profile}` first")
    row = json.loads(storage.read_text(split, **config.storage_kw()).splitlines()[0])
    sentence, reference = row["input"], row["output"]

client = OpenAI(base_url=base_url, api_key=os.environ.get("E2E_LLM_API_KEY", "fake-key"))
response = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "system", "content": config.system_prompt()},
        {"role": "user", "content": sentence},
    ],
    temperature=0.0,
    max_tokens=128,
    stream=True,
)
print(f"{model} <- {sentence}")
for chunk in response:
    if chunk.choices and chunk.choices[0].delta.content is not None:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
if reference is not None:
    print(f"reference: {reference}")
