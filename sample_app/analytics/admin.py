from django.contrib import admin

from .models import Event


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    list_filter = ["name"]
    readonly_fields = ["id", "name", "properties", "created_at"]
