"""JSON over HTTP with a bearer key, for the e2e scripts' admin and work calls."""
import json
import urllib.error
import urllib.request


def send(url, key, method="GET", body=None):
    """Returns (status, parsed JSON body); HTTP errors are answers, not raises."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("authorization", "Bearer " + key)
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
