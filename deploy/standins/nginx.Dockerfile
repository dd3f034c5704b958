# Stands in for nginx:1.27-alpine: nginx in the foreground, configuration mounted. Bookworm's
# nginx (1.22) predates "server ... resolve" (1.27.3), which compose's upstreams.conf needs to
# follow replicas that restart on new addresses, so nginx comes from Debian testing (forky);
# the mirror's testing Release file may be past its Valid-Until date.
FROM local/debian:bookworm
RUN echo "deb http://deb.debian.org/debian forky main" > /etc/apt/sources.list.d/forky.list \
    && apt-get -o Acquire::Check-Valid-Until=false update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -t forky nginx \
    && rm -rf /var/lib/apt/lists/* \
    && nginx -v
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
