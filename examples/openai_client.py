# SPDX-License-Identifier: Apache-2.0
"""Query the served fine-tuned model with the `openai` package, as the tutorial does:
``model="<model_id>:<lora_id>"`` and a streamed answer.

Usage (with `e2e-llm serve --profile local --publish latest` running):
    python examples/openai_client.py
    E2E_LLM_MODEL=smollm2-135m:viggo-v1 python examples/openai_client.py   # a pinned version

Environment: E2E_LLM_BASE_URL (default http://localhost:8000/v1), E2E_LLM_MODEL (default
smollm2-135m:viggo, the alias `e2e-llm publish --alias viggo` maintains), E2E_LLM_API_KEY
(when the service has auth on; any string otherwise), E2E_LLM_PROFILE (default local): the
system prompt is the one that profile's adapters were trained with (its data.system_prompt, else
the task's instruction); an adapter asked with another answers worse.
"""

import os

from openai import OpenAI

from e2e_llm.config import load_profile

base_url = os.environ.get("E2E_LLM_BASE_URL", "http://localhost:8000/v1")
model = os.environ.get("E2E_LLM_MODEL", "smollm2-135m:viggo")
model_id, _, lora_id = model.partition(":")
system_prompt = load_profile(os.environ.get("E2E_LLM_PROFILE", "local")).system_prompt()

# Initialize client
client = OpenAI(base_url=base_url, api_key=os.environ.get("E2E_LLM_API_KEY", "fake-key"))
response = client.chat.completions.create(
    model=f"{model_id}:{lora_id}",
    messages=[
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": "Blizzard North is mostly an okay developer, but they released Diablo II for the Mac and so that pushes the game from okay to good in my view."},  # noqa: E501
    ],
    temperature=0.0,
    max_tokens=128,
    stream=True,
)
for chunk in response:
    if chunk.choices and chunk.choices[0].delta.content is not None:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
