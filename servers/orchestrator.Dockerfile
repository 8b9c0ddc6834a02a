# The gra-async orchestrator: the `orchestrator` services of docker-compose.yml.
# Built from the repository root (context `.`), so the project installs as it is checked out:
#   docker build -f servers/orchestrator.Dockerfile -t gra-async/orchestrator:local .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# The package first (its prompt templates are package data, gra_async/data/prompts/), the
# rest (the compose configs) after: editing a config does not reinstall the dependencies.
# What `.` holds is whitelisted in orchestrator.Dockerfile.dockerignore.
COPY pyproject.toml README.md ./
COPY gra_async ./gra_async
RUN pip install .
COPY . .

# No server here: it only calls the model servers, and exits when the run is done.
CMD ["python", "-m", "gra_async", "run", "--config", "servers/compose.toml"]
