"""Runs inside the probe container: drives Debian's headless chromium through
chromedriver (python3-selenium) the way an operator or a user would, saves a
screenshot per page into the directory given, and prints what each check saw as
JSON. Reads {"screenshots": dir, "untrusted": {...}, "signup": {...}, "rabbitmq": {...},
"flower": {...}} on stdin, each check optional."""

import base64
import json
import sys

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

WAIT_SECONDS = 60  # Flower's table fills in after the page loads; slow on a busy test machine


def browser():
    options = webdriver.ChromeOptions()
    # Root in a container: no user namespace sandbox; /dev/shm is docker's small default.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)


def wait_for_text(driver, text):
    # textContent, not the rendered text: narrow table cells wrap long worker names.
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda driver: text in driver.execute_script("return document.body ? document.body.textContent : ''")
    )


def signup(driver, site, username, email, password):
    """Fill in and send the HTML signup form; the confirmation page names the address."""
    driver.get(f"{site}/signup/")
    driver.find_element(By.NAME, "username").send_keys(username)
    driver.find_element(By.NAME, "email").send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for_text(driver, email)
    return driver.find_element(By.TAG_NAME, "h1").text + " / " + driver.find_element(By.CLASS_NAME, "message").text


def untrusted(driver, site):
    """The site with the kit CA not trusted yet: the browser must stop at its certificate
    warning, and the signup form must not load."""
    driver.get(f"{site}/signup/")
    if driver.find_elements(By.NAME, "username"):
        raise AssertionError("the signup form loaded although the browser does not trust the kit CA")
    return driver.execute_script("return document.body ? document.body.innerText : ''")[:300]


def rabbitmq(driver, url, username, password, queues):
    """Log in to the management UI with its form, open the queues tab, see the app's queues."""
    driver.get(url)
    WebDriverWait(driver, WAIT_SECONDS).until(expected_conditions.presence_of_element_located((By.NAME, "username")))
    driver.find_element(By.NAME, "username").send_keys(username)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for_text(driver, "Overview")
    driver.get(f"{url}#/queues")
    for queue in queues:
        WebDriverWait(driver, WAIT_SECONDS).until(
            expected_conditions.presence_of_element_located((By.LINK_TEXT, queue))
        )
    return "queues listed: " + ", ".join(queues)


def flower(driver, url, username, password, workers):
    """Flower's workers page behind basic auth lists every worker."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    driver.get(f"{url}/workers")
    for worker in workers:
        wait_for_text(driver, worker)
    return "workers listed: " + ", ".join(workers)


def main():
    request = json.load(sys.stdin)
    results = {}
    for name, check in (("untrusted", untrusted), ("signup", signup), ("rabbitmq", rabbitmq), ("flower", flower)):
        if not request.get(name):
            continue
        driver = browser()
        try:
            results[name] = {"ok": True, "saw": check(driver, **request[name])}
        except Exception as error:  # report what the page showed instead
            page = driver.execute_script("return document.body ? document.body.innerText : ''")[:300]
            results[name] = {"ok": False, "saw": f"{type(error).__name__} on {driver.current_url}: {page!r}"}
        finally:
            driver.save_screenshot(f"{request['screenshots']}/{name}.png")
            driver.quit()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
