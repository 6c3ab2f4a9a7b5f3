from celery import shared_task
from django.core.mail import send_mail


@shared_task
def send_receipt(order, recipient):
    send_mail(f"Receipt for order {order}", f"Order {order} is paid.", None, [recipient])
