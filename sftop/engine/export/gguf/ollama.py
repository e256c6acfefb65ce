"""An Ollama `Modelfile` next to the GGUF file: FROM it, the chat template as Ollama's Go
template, and the tokens that end a turn.

Ollama runs Go templates, not Jinja, so the chat template is recognised by its turn markers and
written as the same conversation format in Go template syntax. A template sftop does not recognise
gets no TEMPLATE line (Ollama then falls back to the Jinja template stored in the GGUF file), and
the Modelfile says so.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    marker: str  # a string only this format's Jinja template contains
    go_template: str
    stops: tuple[str, ...]


CHATML = ChatFormat(
    "ChatML",
    "<|im_start|>",
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ("<|im_end|>", "<|im_start|>"),
)
LLAMA3 = ChatFormat(
    "Llama 3",
    "<|start_header_id|>",
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|eot_id|>", "<|start_header_id|>"),
)
GEMMA = ChatFormat(
    "Gemma",
    "<start_of_turn>",
    # Gemma has no system role: a system message is sent as a user turn, as its own template does.
    '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
    "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ("<end_of_turn>", "<start_of_turn>"),
)
MISTRAL = ChatFormat(
    "Mistral",
    "[INST]",
    '{{- range .Messages }}{{ if eq .Role "assistant" }}{{ .Content }}</s>'
    "{{ else }}[INST] {{ .Content }}[/INST]{{ end }}{{ end }}",
    ("[INST]", "</s>"),
)
FORMATS = (CHATML, LLAMA3, GEMMA, MISTRAL)


def chat_format(jinja_template: str | None) -> ChatFormat | None:
    if not jinja_template:
        return None
    for fmt in FORMATS:
        if fmt.marker in jinja_template:
            return fmt
    return None


def modelfile(gguf_name: str, jinja_template: str | None, eos_token: str | None) -> str:
    fmt = chat_format(jinja_template)
    lines = ["# Ollama: `ollama create NAME -f Modelfile`, then `ollama run NAME`.", f"FROM ./{gguf_name}", ""]
    if fmt is not None:
        escaped = fmt.go_template.replace('"""', '\\"\\"\\"')
        lines += [f"# The {fmt.name} chat format of the model's chat template.", f'TEMPLATE """{escaped}"""', ""]
        stops = list(fmt.stops)
    else:
        lines += [
            "# No TEMPLATE: sftop did not recognise the chat template; Ollama reads the one in the GGUF file.",
            "",
        ]
        stops = []
    if eos_token and eos_token not in stops:
        stops.insert(0, eos_token)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
