# The image k8s/ names: pice:0.1.0 (CPU; `docker build -t pice:0.1.0 .`) and pice:0.1.0-cuda
# (`docker build --build-arg VARIANT=cuda -t pice:0.1.0-cuda .`, vLLM for the GPU worker group).
# Both hold pice, Ray Serve (the RayService runs pice.cloud.serve.app:build_app on every node)
# and the packaged models; `pice models prepare` converts them into the models volume.
FROM python:3.11-slim
ARG VARIANT=cpu
WORKDIR /app
# torch first, from the index that matches the variant (a bare `torch` pulls CUDA builds)
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install --no-cache-dir torch==2.13.0; \
    fi
COPY . .
RUN if [ "$VARIANT" = "cpu" ]; then extras="models,ray"; else extras="models,ray,vllm"; fi \
    && pip install --no-cache-dir ".[$extras]"
EXPOSE 8000
CMD ["pice", "serve", "--host", "0.0.0.0"]
