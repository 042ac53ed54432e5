# Speech Pipe: the server, its SIP media workers and the speech engines in one image.
#
#   docker build -t speechpipe:local .
#   docker build --build-arg PJSUA_MAX_CALLS=128 -t speechpipe:local .
#
# Phone calls need pjsua2 (pjproject's Python binding). The PyPI wheel `pjsua2-python` is pjproject 2.15.1
# built with PJSUA_MAX_CALLS=4 (so 4 calls per media worker) and still has an AudioMediaPort teardown bug
# fixed in 2.16. When the build has internet, the first stage builds pjproject ${PJPROJECT_VERSION} (2.16+)
# with a raised PJSUA_MAX_CALLS and our codec preference, and the image uses that binding; without
# internet the stage leaves no wheel behind and the image falls back to the PyPI wheel. The worker reads
# the limit it got at run time (it logs "max N calls, build limit M" and reports it in /healthz). Each
# worker holds its own models: ~0.3-0.4 GB per worker whichever build (docs/telephony.md, "Capacity"), so
# the 64-call build needs far fewer workers, and far less memory, for the same calls.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- pjsua2
FROM ${PYTHON_IMAGE} AS pjsua2
ARG PJPROJECT_VERSION=2.16
ARG PJSUA_MAX_CALLS=64
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential swig curl ca-certificates libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && pip install --no-cache-dir wheel setuptools
WORKDIR /build
# config_site.h: the call limit (and what it needs: sockets for 2 RTP/RTCP pairs per call, bridge slots for
# the stream and our AudioMediaPort per call), and "answerer's codec order wins" so G.722 is chosen
# whenever it is offered, not only when it is offered first.
RUN set -eu; mkdir -p /wheels; \
    url="https://github.com/pjsip/pjproject/archive/refs/tags/${PJPROJECT_VERSION}.tar.gz"; \
    if ! curl -fsSL --retry 2 --connect-timeout 15 "$url" -o pjproject.tar.gz; then \
        echo "pjproject ${PJPROJECT_VERSION} could not be downloaded: the image will use the PyPI pjsua2 wheel"; \
        exit 0; \
    fi; \
    tar xzf pjproject.tar.gz && cd "pjproject-${PJPROJECT_VERSION}"; \
    { echo "#define PJSUA_MAX_CALLS ${PJSUA_MAX_CALLS}"; \
      echo "#define PJ_IOQUEUE_MAX_HANDLES (PJSUA_MAX_CALLS * 4 + 64)"; \
      echo "#define PJSUA_MAX_CONF_PORTS (PJSUA_MAX_CALLS * 3 + 8)"; \
      echo "#define PJMEDIA_SDP_NEG_PREFER_REMOTE_CODEC_ORDER 0"; \
      echo "#define PJSUA_MAX_PLAYERS 4"; \
      echo "#define PJSUA_MAX_RECORDERS 4"; } > pjlib/include/pj/config_site.h; \
    ./configure --enable-epoll --disable-video --disable-sound --disable-libwebrtc --disable-opencore-amr \
        --disable-silk --disable-bcg729 --disable-libyuv --disable-openh264 --disable-ffmpeg --disable-sdl \
        --disable-v4l2 --disable-speex-aec CFLAGS="-O2 -fPIC" CXXFLAGS="-O2 -fPIC"; \
    make dep && make -j"$(nproc)"; \
    cd pjsip-apps/src/swig/python && make && python setup.py bdist_wheel -d /wheels; \
    ls -l /wheels

# ---------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng libsndfile1 ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 speechpipe
WORKDIR /app
COPY --from=pjsua2 /wheels /wheels
COPY pyproject.toml README.md ./
COPY speechpipe speechpipe
COPY pipeline pipeline
COPY storage storage
COPY runner runner
COPY websocket_edge websocket_edge
COPY telephony telephony
COPY examples examples
# The image runs `serve`, so it installs the server extra. With a self-built pjsua2 wheel: install it and
# every dependency (base and server) except the PyPI pjsua2-python (both provide the `pjsua2` module).
# Without one: a plain install pulls the PyPI wheel.
RUN set -eu; \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir /wheels/*.whl; \
        python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = p['dependencies'] + p['optional-dependencies']['server']; \
print('\n'.join(d for d in deps if not d.startswith('pjsua2-python')))" > /tmp/deps.txt; \
        pip install --no-cache-dir -r /tmp/deps.txt && pip install --no-cache-dir --no-deps .; \
    else \
        pip install --no-cache-dir '.[server]'; \
    fi; \
    rm -rf /wheels; \
    python -c "import pjsua2, speechpipe.telephony.media as m; print('pjsua2 ok, direct frame path:', m.DIRECT)"; \
    mkdir -p /data && chown speechpipe: /data
USER speechpipe
ENV SPEECHPIPE_DATA_DIR=/data \
    SPEECHPIPE_HOST=0.0.0.0 \
    SPEECHPIPE_SIP_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
# 8780: REST, WebSockets, test page. 5080+: one UDP SIP port per media worker (SPEECHPIPE_SIP_WORKERS).
EXPOSE 8780 5080/udp 5081/udp
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"SPEECHPIPE_PORT\", \"8780\")}/healthz', timeout=2)"
CMD ["speechpipe", "serve"]
