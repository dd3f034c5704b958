# Stands in for python:3.11-slim-bookworm: Debian's Python 3.11, with venv and pip.
FROM local/debian:bookworm
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python-is-python3 ca-certificates \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# pip trusts the system store (with the certificates above), not only its own bundle.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8
CMD ["python3"]
