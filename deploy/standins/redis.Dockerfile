# Stands in for redis:7-alpine: Debian's redis-server (7.0) and redis-cli, data in /data.
FROM local/debian:bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data \
    # As the official image does: with no configuration file, protected mode (loopback
    # only) is turned off, or no other container could connect.
    && printf '#!/bin/sh\nif [ "$1" = redis-server ]; then set -- "$@" --protected-mode no; fi\nexec "$@"\n' \
        > /usr/local/bin/docker-entrypoint.sh \
    && chmod +x /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
