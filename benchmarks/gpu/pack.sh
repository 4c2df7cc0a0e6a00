#!/usr/bin/env bash
# Packs everything the GPU machine lacks for the GPU stages and their CLI into .gpu/site312.tgz.
#
#   benchmarks/gpu/pack.sh            # run here (needs PyPI); carries: .gpu/site312.tgz (about 45 MB)
#
# The machine has torch, transformers, peft, accelerate, timm, numpy, pandas, pyarrow, typer, rich, matplotlib,
# fsspec, huggingface_hub, httpx, anyio, ... (see ../shared/gpu/README.md); ../shared/gpu/pack-wheels.sh brings
# Unsloth, TRL, datasets, bitsandbytes and pydantic. On top of those this adds what `uv export --extra gpu
# --no-dev` lists and the machine lacks: Prefect (the CLI runs every stage as a flow, with an ephemeral API
# server: sqlalchemy, alembic, aiosqlite, asyncpg, fastapi, uvicorn, ...), openai and tenacity. xformers is left
# out (built for another torch; Unsloth runs without it). Prefect's web UI bundles and apprise (imported only
# when a notification is sent) are dropped to stay well under the 64 MiB a device call may carry.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
extra=(
  aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 asgi-lifespan==2.1.0 asyncpg==0.32.0
  beartype==0.23.1 burner-redis==0.1.7 cachetools==7.3.3 cffi==2.1.1 coolname==5.0.0 cronsim==2.8
  cryptography==50.0.2 cyclopts==5.5.2 dateparser==1.5.0 docker==7.2.0 exceptiongroup==1.3.2 fastapi==0.150.0
  graphviz==0.21 greenlet==3.5.6 griffe==2.4.1 griffecli==2.4.1 griffelib==2.4.1 h2==4.4.1 hpack==4.2.0
  httpcore2==2.16.2 httpx2==2.16.2 hyperframe==6.1.0 importlib-metadata==10.2.0 jinja2-humanize-extension==0.4.0
  jiter==0.19.0 jsonpatch==1.48 jsonpointer==3.12 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  lazy-importer==0.1.0 mako==1.4.3 oauthlib==4.0.1 openai==3.57.0 opentelemetry-api==1.45.2 orjson==3.13.0
  pendulum==3.3.0 prefect==3.9.1 py-key-value-aio==0.5.0 pycparser==3.12 pydantic-extra-types==2.11.1
  pydocket==0.27.0 python-json-logger==4.2.0 python-slugify==9.1.3 pytz==2026.6 readchar==4.2.2 redis==8.1.0
  referencing==0.37.0 requests-oauthlib==2.0.0 rfc3339-validator==0.1.4 rich-rst==2.2.0 rpds-py==2026.9.1
  ruamel-yaml==0.19.1 semver==3.1.2 sniffio==1.3.1 sqlalchemy==2.1.9 starlette==1.10.0 tenacity==9.2.1
  text-unidecode==1.3 toml==0.10.2 truststore==0.10.5 tzdata==2026.6 tzlocal==5.4.5 uncalled-for==0.6.2
  uvicorn==0.54.0 websockets==16.1.1 whenever==0.11.0
)
bash ../shared/gpu/pack-wheels.sh "${extra[@]}"
site=$(mktemp -d)
tar xzf .gpu/site312.tgz -C "$site"
rm -rf "$site"/prefect/server/ui "$site"/prefect/server/ui-v2 "$site"/apprise "$site"/apprise-*.dist-info
tar czf .gpu/site312.tgz -C "$site" .
rm -rf "$site"
ls -la .gpu/site312.tgz
